"""Errors that carry their gRPC status.

Code below the servicers raises these; the serving interceptor turns each into its status code.
Any other exception reaching the interceptor is a bug and is reported as INTERNAL (never UNKNOWN).
`StartupError` is the exception: a process that cannot start raises it for the CLI to print.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with a gRPC status code and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Bad input: the message always starts with the offending field's path."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class StartupError(Exception):
    """A process cannot start for a reason its user can fix (not a gRPC status).

    `cause` says what is wrong; `settings` names the `Settings` fields to change. The CLI prints
    it as one line: `rlhf serve policy: cannot start: <cause> (set --flag / RLHF_FIELD)`.
    """

    def __init__(self, cause: str, *settings: str):
        super().__init__(cause)
        self.cause = cause
        self.settings = settings

    def __str__(self) -> str:
        if not self.settings:
            return self.cause
        return f"{self.cause} (set {' or '.join('RLHF_' + s.upper() for s in self.settings)})"

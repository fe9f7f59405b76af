"""Errors that carry their gRPC status.

Code below the servicers raises these; the serving interceptor turns each into its status code
(`status_of_error`: the one place a status is built, so every INVALID_ARGUMENT carries its
`google.rpc.BadRequest` field violations).
Any other exception reaching the interceptor is a bug and is reported as INTERNAL (never UNKNOWN).
`StartupError` is the exception: a process that cannot start raises it for the CLI to print.
"""

from __future__ import annotations

from typing import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ServiceError(Exception):
    """An error with a gRPC status code and a message meant for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    violations: tuple[tuple[str, str], ...] = ()  # (field, problem): InvalidArgument's

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Bad input: the message always starts with the offending field's path.

    `field` is the path in the proto request (`prompts[2].token_ids.ids[0]`, `params.top_p`);
    `violations` holds one (field, problem) per bad field, sent as `google.rpc.BadRequest` field
    violations. `InvalidArgument(field, problem)` names one; `InvalidArgument.of(...)` several.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, *more: tuple[str, str]):
        violations = ((field, problem), *more)
        super().__init__("; ".join(f"{f}: {p}" for f, p in violations))
        self.field = field
        self.violations = violations

    @classmethod
    def of(cls, violations: Sequence[tuple[str, str]]) -> "InvalidArgument":
        """One error naming every (field, problem) given (at least one)."""
        first, *more = violations
        return cls(*first, *more)


def grpc_status(code: grpc.StatusCode, message: str, *, violations: Sequence[tuple[str, str]] = (),
                trailing_metadata: Sequence[tuple[str, str]] = ()) -> grpc.Status:
    """The status a server aborts with (`context.abort_with_status`): code and message, plus a
    `google.rpc.Status` in the `grpc-status-details-bin` trailer carrying a `google.rpc.BadRequest`
    with one field violation per (field, description) given. `trailing_metadata` is sent beside it
    (abort_with_status replaces whatever trailing metadata was set before)."""
    rich = status_pb2.Status(code=code.value[0], message=message)
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
        ])
        detail = any_pb2.Any()
        detail.Pack(bad)
        rich.details.append(detail)
    status = rpc_status.to_status(rich)
    return status._replace(trailing_metadata=(*status.trailing_metadata, *trailing_metadata))


def status_of_error(exc: ServiceError, *, trailing_metadata: Sequence[tuple[str, str]] = ()) -> grpc.Status:
    """A ServiceError's status: INVALID_ARGUMENT carries its field violations."""
    return grpc_status(exc.code, exc.message, violations=exc.violations, trailing_metadata=trailing_metadata)


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

from rlhfpb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogProbsItem(_message.Message):
    __slots__ = ("prompt_ids", "completion_ids")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., completion_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LogProbsItem]
    def __init__(self, items: _Optional[_Iterable[_Union[LogProbsItem, _Mapping]]] = ...) -> None: ...

class LogProbsResult(_message.Message):
    __slots__ = ("logprobs", "sum")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    sum: float
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., sum: _Optional[float] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("results", "model", "dtype")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LogProbsResult]
    model: _common_pb2.ModelRef
    dtype: str
    def __init__(self, results: _Optional[_Iterable[_Union[LogProbsResult, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., dtype: _Optional[str] = ...) -> None: ...

from gradstream.v1 import trainer_pb2 as _trainer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContractRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ContractResponse(_message.Message):
    __slots__ = ("identity", "checker", "queue_depth")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CHECKER_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    identity: int
    checker: str
    queue_depth: int
    def __init__(self, identity: _Optional[int] = ..., checker: _Optional[str] = ..., queue_depth: _Optional[int] = ...) -> None: ...

class TrainOpen(_message.Message):
    __slots__ = ("model", "producer_id", "report_every", "identity")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    producer_id: str
    report_every: int
    identity: int
    def __init__(self, model: _Optional[str] = ..., producer_id: _Optional[str] = ..., report_every: _Optional[int] = ..., identity: _Optional[int] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("offset", "dtype", "shape")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offset: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Columns(_message.Message):
    __slots__ = ("x", "y", "sample_weight", "more")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    x: Slice
    y: Slice
    sample_weight: Slice
    more: _containers.RepeatedCompositeFieldContainer[Slice]
    def __init__(self, x: _Optional[_Union[Slice, _Mapping]] = ..., y: _Optional[_Union[Slice, _Mapping]] = ..., sample_weight: _Optional[_Union[Slice, _Mapping]] = ..., more: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("sequence", "columns", "rejected")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    columns: Columns
    rejected: str
    def __init__(self, sequence: _Optional[int] = ..., columns: _Optional[_Union[Columns, _Mapping]] = ..., rejected: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("open", "slot", "segment", "items", "block", "sequences")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    open: TrainOpen
    slot: int
    segment: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    block: Columns
    sequences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, open: _Optional[_Union[TrainOpen, _Mapping]] = ..., slot: _Optional[int] = ..., segment: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., block: _Optional[_Union[Columns, _Mapping]] = ..., sequences: _Optional[_Iterable[int]] = ...) -> None: ...

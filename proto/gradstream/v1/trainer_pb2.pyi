from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_APPLIED: _ClassVar[Outcome]
    OUTCOME_ACCUMULATED: _ClassVar[Outcome]
    OUTCOME_SKIPPED_NONFINITE: _ClassVar[Outcome]
    OUTCOME_DUPLICATE: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_SAFETENSORS: _ClassVar[ExportFormat]
    EXPORT_FORMAT_PT2: _ClassVar[ExportFormat]
    EXPORT_FORMAT_ONNX: _ClassVar[ExportFormat]
    EXPORT_FORMAT_TRITON: _ClassVar[ExportFormat]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_INT32: DataType
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_APPLIED: Outcome
OUTCOME_ACCUMULATED: Outcome
OUTCOME_SKIPPED_NONFINITE: Outcome
OUTCOME_DUPLICATE: Outcome
OUTCOME_REJECTED: Outcome
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_SAFETENSORS: ExportFormat
EXPORT_FORMAT_PT2: ExportFormat
EXPORT_FORMAT_ONNX: ExportFormat
EXPORT_FORMAT_TRITON: ExportFormat

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared", "padding")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared: SharedSlice
    padding: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared: _Optional[_Union[SharedSlice, _Mapping]] = ..., padding: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("name", "kind", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SharedSlice(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Architecture(_message.Message):
    __slots__ = ("kind", "in_features", "out_features", "hidden", "activation", "bias", "options", "embeddings", "dense_features")
    KIND_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    in_features: int
    out_features: int
    hidden: _containers.RepeatedScalarFieldContainer[int]
    activation: str
    bias: bool
    options: _struct_pb2.Struct
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dense_features: int
    def __init__(self, kind: _Optional[str] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ..., hidden: _Optional[_Iterable[int]] = ..., activation: _Optional[str] = ..., bias: _Optional[bool] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dense_features: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("input", "num_embeddings", "dim", "mode")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    input: str
    num_embeddings: int
    dim: int
    mode: str
    def __init__(self, input: _Optional[str] = ..., num_embeddings: _Optional[int] = ..., dim: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class Init(_message.Message):
    __slots__ = ("kind", "seed", "tensors")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    seed: int
    tensors: _containers.MessageMap[str, Tensor]
    def __init__(self, kind: _Optional[str] = ..., seed: _Optional[int] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class Loss(_message.Message):
    __slots__ = ("kind", "reduction", "delta")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    kind: str
    reduction: str
    delta: float
    def __init__(self, kind: _Optional[str] = ..., reduction: _Optional[str] = ..., delta: _Optional[float] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("kind", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused", "betas", "eps", "amsgrad", "capturable", "decoupled_weight_decay", "lr_decay", "initial_accumulator_value", "alpha", "centered")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
    FOREACH_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    BETAS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    CAPTURABLE_FIELD_NUMBER: _ClassVar[int]
    DECOUPLED_WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CENTERED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    foreach: bool
    differentiable: bool
    fused: bool
    betas: _containers.RepeatedScalarFieldContainer[float]
    eps: float
    amsgrad: bool
    capturable: bool
    decoupled_weight_decay: bool
    lr_decay: float
    initial_accumulator_value: float
    alpha: float
    centered: bool
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., weight_decay: _Optional[float] = ..., nesterov: _Optional[bool] = ..., maximize: _Optional[bool] = ..., foreach: _Optional[bool] = ..., differentiable: _Optional[bool] = ..., fused: _Optional[bool] = ..., betas: _Optional[_Iterable[float]] = ..., eps: _Optional[float] = ..., amsgrad: _Optional[bool] = ..., capturable: _Optional[bool] = ..., decoupled_weight_decay: _Optional[bool] = ..., lr_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., alpha: _Optional[float] = ..., centered: _Optional[bool] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("kind", "step_size", "gamma", "milestones", "t_max", "eta_min", "start_factor", "end_factor", "total_iters", "factor", "schedulers")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    MILESTONES_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    ETA_MIN_FIELD_NUMBER: _ClassVar[int]
    START_FACTOR_FIELD_NUMBER: _ClassVar[int]
    END_FACTOR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITERS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step_size: int
    gamma: float
    milestones: _containers.RepeatedScalarFieldContainer[int]
    t_max: int
    eta_min: float
    start_factor: float
    end_factor: float
    total_iters: int
    factor: float
    schedulers: _containers.RepeatedCompositeFieldContainer[Schedule]
    def __init__(self, kind: _Optional[str] = ..., step_size: _Optional[int] = ..., gamma: _Optional[float] = ..., milestones: _Optional[_Iterable[int]] = ..., t_max: _Optional[int] = ..., eta_min: _Optional[float] = ..., start_factor: _Optional[float] = ..., end_factor: _Optional[float] = ..., total_iters: _Optional[int] = ..., factor: _Optional[float] = ..., schedulers: _Optional[_Iterable[_Union[Schedule, _Mapping]]] = ...) -> None: ...

class ClipGrad(_message.Message):
    __slots__ = ("max_norm", "norm_type", "value")
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    max_norm: float
    norm_type: float
    value: float
    def __init__(self, max_norm: _Optional[float] = ..., norm_type: _Optional[float] = ..., value: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("architecture", "init", "loss", "optimizer", "accumulate_steps", "dtype", "frozen", "schedule", "clip_grad")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_FIELD_NUMBER: _ClassVar[int]
    architecture: Architecture
    init: Init
    loss: Loss
    optimizer: Optimizer
    accumulate_steps: int
    dtype: str
    frozen: _containers.RepeatedScalarFieldContainer[str]
    schedule: Schedule
    clip_grad: ClipGrad
    def __init__(self, architecture: _Optional[_Union[Architecture, _Mapping]] = ..., init: _Optional[_Union[Init, _Mapping]] = ..., loss: _Optional[_Union[Loss, _Mapping]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., accumulate_steps: _Optional[int] = ..., dtype: _Optional[str] = ..., frozen: _Optional[_Iterable[str]] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., clip_grad: _Optional[_Union[ClipGrad, _Mapping]] = ...) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape", "frozen")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    frozen: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., frozen: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "spec", "step", "pending_batches", "device", "parameters", "autograd_chain", "nonfinite_streak", "lr", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PENDING_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    AUTOGRAD_CHAIN_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_STREAK_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: ModelSpec
    step: int
    pending_batches: int
    device: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    autograd_chain: _containers.RepeatedScalarFieldContainer[str]
    nonfinite_streak: int
    lr: float
    inputs: _containers.RepeatedCompositeFieldContainer[InputInfo]
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., step: _Optional[int] = ..., pending_batches: _Optional[int] = ..., device: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., autograd_chain: _Optional[_Iterable[str]] = ..., nonfinite_streak: _Optional[int] = ..., lr: _Optional[float] = ..., inputs: _Optional[_Iterable[_Union[InputInfo, _Mapping]]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("name", "spec", "program")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: ModelSpec
    program: bytes
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., program: _Optional[bytes] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("name", "lr", "freeze", "unfreeze")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    UNFREEZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    freeze: _containers.RepeatedScalarFieldContainer[str]
    unfreeze: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., freeze: _Optional[_Iterable[str]] = ..., unfreeze: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("x", "y", "sample_weight", "sequence", "inputs")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    y: Tensor
    sample_weight: Tensor
    sequence: int
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ..., sample_weight: _Optional[_Union[Tensor, _Mapping]] = ..., sequence: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class TrainOpen(_message.Message):
    __slots__ = ("model", "producer_id", "report_every", "shared_memory")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    producer_id: str
    report_every: int
    shared_memory: str
    def __init__(self, model: _Optional[str] = ..., producer_id: _Optional[str] = ..., report_every: _Optional[int] = ..., shared_memory: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("open", "batches")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    open: TrainOpen
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    def __init__(self, open: _Optional[_Union[TrainOpen, _Mapping]] = ..., batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("sequence", "step", "loss", "outcome", "reason")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    step: int
    loss: float
    outcome: Outcome
    reason: str
    def __init__(self, sequence: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class StreamState(_message.Message):
    __slots__ = ("model", "step", "last_applied_sequence", "last_durable_sequence")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_DURABLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    last_applied_sequence: int
    last_durable_sequence: int
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., last_applied_sequence: _Optional[int] = ..., last_durable_sequence: _Optional[int] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("opened", "results", "last_durable_sequence")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    LAST_DURABLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    opened: StreamState
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    last_durable_sequence: int
    def __init__(self, opened: _Optional[_Union[StreamState, _Mapping]] = ..., results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., last_durable_sequence: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("name", "x", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    x: Tensor
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, name: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("y", "step")
    Y_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    step: int
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class ComputeGradientsRequest(_message.Message):
    __slots__ = ("name", "x", "y", "sample_weight", "grad_output", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    x: Tensor
    y: Tensor
    sample_weight: Tensor
    grad_output: Tensor
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, name: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ..., sample_weight: _Optional[_Union[Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ComputeGradientsResponse(_message.Message):
    __slots__ = ("gradients", "loss")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    gradients: _containers.MessageMap[str, Tensor]
    loss: float
    def __init__(self, gradients: _Optional[_Mapping[str, Tensor]] = ..., loss: _Optional[float] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("name", "include_gradients")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    include_gradients: bool
    def __init__(self, name: _Optional[str] = ..., include_gradients: _Optional[bool] = ...) -> None: ...

class GetParametersResponse(_message.Message):
    __slots__ = ("parameters", "gradients", "step")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.MessageMap[str, Tensor]
    gradients: _containers.MessageMap[str, Tensor]
    step: int
    def __init__(self, parameters: _Optional[_Mapping[str, Tensor]] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ..., step: _Optional[int] = ...) -> None: ...

class SetParametersRequest(_message.Message):
    __slots__ = ("name", "parameters", "reset_optimizer")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RESET_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameters: _containers.MessageMap[str, Tensor]
    reset_optimizer: bool
    def __init__(self, name: _Optional[str] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ..., reset_optimizer: _Optional[bool] = ...) -> None: ...

class SetParametersResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint", "step", "producer_sequences")
    class ProducerSequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    step: int
    producer_sequences: _containers.ScalarMap[str, int]
    def __init__(self, checkpoint: _Optional[str] = ..., step: _Optional[int] = ..., producer_sequences: _Optional[_Mapping[str, int]] = ...) -> None: ...

class EvaluateOpen(_message.Message):
    __slots__ = ("model", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    top_k: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., top_k: _Optional[_Iterable[int]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("open", "batches")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    open: EvaluateOpen
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    def __init__(self, open: _Optional[_Union[EvaluateOpen, _Mapping]] = ..., batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("model", "step", "rows", "loss", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    rows: int
    loss: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., rows: _Optional[int] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("name", "format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: ExportFormat
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ...) -> None: ...

class ExportModelResponse(_message.Message):
    __slots__ = ("path", "data", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    step: int
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...

"""Building the module, loss and optimizer a spec describes.

Architectures other than ``linear`` and ``mlp`` come from plug-ins: a package
registers a callable ``(ArchitectureSpec) -> torch.nn.Module`` under the
entry-point group ``gradstream.architectures``, keyed by its ``kind``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gradstream.server.errors import InvalidArgument
from gradstream.server.spec import ArchitectureSpec, InputSpec, LossSpec, ModelSpec

ArchitectureBuilder = Callable[[ArchitectureSpec], nn.Module]
ENTRY_POINT_GROUP = "gradstream.architectures"

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def _linear(spec: ArchitectureSpec) -> nn.Module:
    return nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)


def _mlp(spec: ArchitectureSpec) -> nn.Module:
    widths = [spec.in_features, *spec.hidden, spec.out_features]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(_ACTIVATIONS[spec.activation]())
        layers.append(nn.Linear(fan_in, fan_out, bias=spec.bias))
    return nn.Sequential(*layers)


class EmbeddingMLP(nn.Module):
    """``embedding_mlp``: an ``EmbeddingBag`` per id input, then ``dense``, then an mlp.

    ``forward`` takes its inputs positionally, in declaration order (``model_inputs``):
    each table's int64 ids as (rows, bag) in the listed order, then ``dense`` as
    (rows, dense_features) when the spec has dense features.
    """

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                e.input: nn.EmbeddingBag(e.num_embeddings, e.dim, mode=e.mode)
                for e in spec.embeddings
            }
        )
        self.mlp = _mlp(spec)
        self.dense_features = spec.dense_features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The mlp of ``cat([table_1(ids_1), ..., table_k(ids_k), dense], dim=1)``."""
        features = [
            table(ids) for table, ids in zip(self.embeddings.values(), inputs, strict=False)
        ]
        if self.dense_features:
            features.append(inputs[len(self.embeddings)])
        output: torch.Tensor = self.mlp(torch.cat(features, dim=1))
        return output


def _embedding_mlp(spec: ArchitectureSpec) -> nn.Module:
    return EmbeddingMLP(spec)


def _exported(spec: ArchitectureSpec) -> nn.Module:
    # Imported here: the archive checks are only needed by servers that get one.
    from gradstream.server.exported import build

    return build(spec.program)


@functools.cache
def architectures() -> dict[str, ArchitectureBuilder]:
    """Every known architecture: the built-ins, then installed plug-ins."""
    found: dict[str, ArchitectureBuilder] = {
        "linear": _linear,
        "mlp": _mlp,
        "embedding_mlp": _embedding_mlp,
        "exported": _exported,
    }
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, point.load())
    return found


def model_inputs(spec: ModelSpec) -> tuple[InputSpec, ...]:
    """The inputs a spec's module takes, in the order it takes them.

    ``linear``, ``mlp`` and plug-ins: one float ``x`` of (rows, in_features).
    ``embedding_mlp``: each table's ids (rows, bag) in the listed order, then ``dense``.
    ``exported``: the program's user inputs, by name, as it declares them.
    """
    arch = spec.architecture
    if arch.kind == "embedding_mlp":
        tables = tuple(
            InputSpec(e.input, "integer", (-1,), e.num_embeddings) for e in arch.embeddings
        )
        dense = (InputSpec("dense", "float", (arch.dense_features,)),)
        return tables + dense if arch.dense_features else tables
    if arch.kind == "exported":
        # Imported here: the archive checks are only needed by servers that get one.
        from gradstream.server.exported import signature

        return signature(arch.program, 0)[0]
    return (InputSpec("x", "float", (arch.in_features,)),)


def example_inputs(
    inputs: Sequence[InputSpec], rows: int, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[torch.Tensor, ...]:
    """Zeros shaped like a batch of ``rows`` rows (ids 0, and 2 where any size is accepted).

    Two, not one: torch.export specializes a dimension of size 0 or 1.
    """
    return tuple(
        torch.zeros(
            (rows, *(2 if d < 0 else d for d in i.shape)),
            dtype=dtype if i.kind == "float" else torch.int64,
            device=device,
        )
        for i in inputs
    )


def build_module(spec: ModelSpec, device: torch.device) -> nn.Module:
    """The spec's network with its initial parameters, on ``device`` in the spec's dtype."""
    builders = architectures()
    kind = spec.architecture.kind
    if kind not in builders:
        known = ", ".join(sorted(builders))
        raise InvalidArgument(
            "spec.architecture.kind", f"unknown architecture {kind!r}; known: {known}"
        )
    # A private RNG stream: the same seed gives the same weights whatever else ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init.seed)
        module = builders[kind](spec.architecture)
    names = {name for name, _ in module.named_parameters()}
    _check_names(spec.frozen, names, "spec.frozen")
    with torch.no_grad():
        if spec.init.kind in ("zeros", "tensors"):
            for p in module.parameters():
                p.zero_()
        if spec.init.kind == "tensors":
            _check_names(tuple(spec.init.tensors), names, "spec.init.tensors")
            params = dict(module.named_parameters())
            for name, value in spec.init.tensors.items():
                target = params[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise InvalidArgument(
                        f"spec.init.tensors[{name}]",
                        f"has shape {list(value.shape)}, the parameter has {list(target.shape)}",
                    )
                target.copy_(torch.from_numpy(value.astype("float64", copy=False)))
    module = module.to(device=device, dtype=DTYPES[spec.dtype])
    for name, p in module.named_parameters():
        p.requires_grad_(name not in spec.frozen)
    return module


def activation_row_bytes(spec: ModelSpec) -> int:
    """About what one row of a batch costs a forward and backward pass, in bytes.

    Built-in architectures: every layer's output and its activation's are kept for
    backward, and backward holds gradients about twice the widest layer at a time.
    Plug-ins: the tensors autograd saves for one row, measured on the meta device
    (nothing allocated); 0 when that cannot be measured, and only ``max_batch_rows``
    bounds their batches then.
    """
    arch = spec.architecture
    itemsize = DTYPES[spec.dtype].itemsize
    if arch.kind in ("linear", "mlp"):
        widths = [arch.in_features, *arch.hidden, arch.out_features]
        return itemsize * (2 * sum(arch.hidden) + arch.out_features + 2 * max(widths))
    return _measured_row_bytes(spec)


def _measured_row_bytes(spec: ModelSpec) -> int:
    builder = architectures().get(spec.architecture.kind)
    if builder is None:
        return 0
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    # An archive's tensors load on the CPU only; its module is moved to meta once built.
    loaded = builder(spec.architecture) if spec.architecture.kind == "exported" else None
    dtype = DTYPES[spec.dtype]
    declared = model_inputs(spec)  # off the meta device: a program loads its own tensors

    def cost(rows: int) -> int:
        saved[0] = 0
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if loaded is not None:
                module = loaded.to(device="meta", dtype=dtype)
            else:
                module = builder(spec.architecture).to(dtype)
            inputs = example_inputs(declared, rows, dtype, torch.device("meta"))
            for value in inputs:
                value.requires_grad_(value.is_floating_point())
            out = module(*inputs)
            return int(saved[0] + out.numel() * out.element_size())

    # An exported program's row dimension may exclude 1 (torch specializes a size of 1).
    rows = 2 if loaded is not None else 1
    try:
        per_row = cost(rows + 1) - cost(rows)
    except Exception:  # a plug-in that does not run on meta tensors: not measurable
        return 0
    # Backward's gradients take about as much again.
    return 2 * max(per_row, 0)


Forward = Callable[[torch.Tensor], torch.Tensor]
# torch's registries of hooks every module call runs (register_module_forward_hook & co.).
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _layer_function(layer: nn.Module) -> Forward | None:
    """The ATen call a built-in layer's ``forward`` makes, with the same arguments."""
    match layer:
        # Exact types: a subclass may override forward. The parameters are bound here;
        # nothing in gradstream rebinds them (restore and set_parameters copy in place).
        case nn.Linear() if type(layer) is nn.Linear:
            weight, bias = layer.weight, layer.bias
            return lambda x: F.linear(x, weight, bias)
        case nn.ReLU() if type(layer) is nn.ReLU and not layer.inplace:
            return torch.relu
        case nn.Tanh() if type(layer) is nn.Tanh:
            return torch.tanh
        case nn.Sigmoid() if type(layer) is nn.Sigmoid:
            return torch.sigmoid
        case nn.GELU() if type(layer) is nn.GELU:
            approximate = layer.approximate
            return lambda x: F.gelu(x, approximate=approximate)
    return None


def forward_function(module: nn.Module) -> Forward:
    """``module``'s forward pass as a flat chain of ATen calls where it is built-in layers only.

    ``nn.Module.__call__`` costs microseconds a layer in hook and dispatch bookkeeping:
    the chain made a trainer on one CPU thread 5-10 % faster (mlp 64-64 on batches of 256;
    measured here). It makes the calls ``forward`` would: the same result, bit for bit.
    Anything else (a plug-in's module, a layer with hooks) is called as the module itself.
    """
    layers = list(module) if type(module) is nn.Sequential else [module]
    functions = [_layer_function(layer) for layer in layers]
    # Hooks are looked at once, here: gradstream registers none, on modules or globally.
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in module.modules()
    ) or any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS)
    chain = [f for f in functions if f is not None]
    if hooked or len(chain) != len(layers):
        return module
    if len(chain) == 1:
        return chain[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        for f in chain:
            x = f(x)
        return x

    return forward


Reduction = Literal["mean", "sum", "none"]


def loss_value(
    spec: LossSpec,
    output: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    denominator: float | None = None,
) -> torch.Tensor:
    """The scalar loss; with sample weights ``sum(w * l_i) / sum(w)`` (mean) or ``sum(w * l_i)``.

    ``l_i`` is row i's loss, reduced over its own elements the same way (mean or sum),
    so that unit weights give the unweighted loss. ``denominator`` replaces what a mean
    divides by (the element count, or ``sum(w)``): a shard's part of a larger batch's loss.
    """
    if weight is None and denominator is None:
        return _elementwise(spec, output, y, spec.reduction)
    if weight is None:
        total = _elementwise(spec, output, y, "sum")
    else:
        per_element = _elementwise(spec, output, y, "none")
        if per_element.ndim > 1:
            dims = tuple(range(1, per_element.ndim))
            per_element = (
                per_element.mean(dims) if spec.reduction == "mean" else per_element.sum(dims)
            )
        total = (weight * per_element).sum()
    if spec.reduction == "sum":
        return total
    if denominator is None:
        assert weight is not None
        return total / weight.sum()
    return total / torch.tensor(denominator, dtype=total.dtype, device=total.device)


LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def loss_function(spec: LossSpec) -> LossFunction:
    """``loss_value`` for one spec, with the unweighted case bound to torch's own kernel.

    ``torch.nn.functional`` re-parses the reduction and re-checks shapes on every
    call; the batch shapes are already validated, so the hot path calls the same
    ATen op that F would, with the same arguments: same result, bit for bit.
    """
    reduction = {"mean": 1, "sum": 2}[spec.reduction]  # torch's Reduction enum
    aten: Any = torch._C._nn  # its stubs say str; the ops take the enum int
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "mse": lambda o, y: aten.mse_loss(o, y, reduction),
        "l1": lambda o, y: aten.l1_loss(o, y, reduction),
        "huber": lambda o, y: aten.huber_loss(o, y, reduction, spec.delta),
        "cross_entropy": lambda o, y: aten.cross_entropy_loss(o, y, None, reduction, -100, 0.0),
        "bce_with_logits": lambda o, y: torch.binary_cross_entropy_with_logits(
            o, y, None, None, reduction
        ),
    }
    kernel = kernels[spec.kind]

    def compute(output: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return kernel(output, y)
        return loss_value(spec, output, y, weight)

    return compute


def _elementwise(
    spec: LossSpec, output: torch.Tensor, y: torch.Tensor, reduction: Reduction
) -> torch.Tensor:
    match spec.kind:
        case "mse":
            return F.mse_loss(output, y, reduction=reduction)
        case "l1":
            return F.l1_loss(output, y, reduction=reduction)
        case "huber":
            return F.huber_loss(output, y, reduction=reduction, delta=spec.delta)
        case "cross_entropy":
            return F.cross_entropy(output, y, reduction=reduction)
        case "bce_with_logits":
            return F.binary_cross_entropy_with_logits(output, y, reduction=reduction)


def _check_names(given: tuple[str, ...], known: set[str], field: str) -> None:
    for name in given:
        if name not in known:
            raise InvalidArgument(
                field, f"no parameter named {name!r}; the model has {', '.join(sorted(known))}"
            )

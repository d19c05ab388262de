"""Exporting a model in the formats serving systems load.

The model's worker only copies the parameters and buffers (``copy_model``); the
encoding (``write``) runs on another thread, on a module rebuilt from the spec on the
CPU, so training waits for the copy and nothing else. Formats:

=============  ==========================================================================
safetensors    ``model.safetensors``: parameters and buffers; spec, step, model as metadata
pt2            ``model.pt2``: ``torch.export`` of the module in eval mode, batch dimension free
onnx           ``model.onnx``: ``torch.onnx.export`` (needs the ``export`` extra)
triton         ``<model>/config.pbtxt`` + ``<model>/<step>/model.onnx``: a Triton repository
=============  ==========================================================================

Inputs are named as the model declares them (``models.model_inputs``: ``x`` (rows,
in_features) for ``linear`` and ``mlp``; each table's ids and ``dense`` for
``embedding_mlp``), in declaration order, and the output ``y`` (rows, out_features), in
every format that names them. The row dimension, and any input size declared free (an
id bag's length), are dynamic.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import threading
from collections.abc import Generator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from gradstream.server.engine import Trainer
from gradstream.server.errors import FailedPrecondition, InvalidArgument
from gradstream.server.models import DTYPES, build_module, example_inputs, model_inputs
from gradstream.server.spec import InputSpec, ModelSpec, parse_spec

CHUNK_BYTES = 1024 * 1024
SAFETENSORS_FILE = "model.safetensors"
PT2_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
TRITON_CONFIG = "config.pbtxt"
_TRITON_TYPES = {"float32": "TYPE_FP32", "float64": "TYPE_FP64", "integer": "TYPE_INT64"}
# torch.export and the ONNX exporter trace with process-wide state (dynamo's caches,
# the exporter's registries): one export at a time.
_EXPORT_LOCK = threading.Lock()


class ExportFormat(StrEnum):
    """An export's encoding."""

    SAFETENSORS = "safetensors"
    PT2 = "pt2"
    ONNX = "onnx"
    TRITON = "triton"


@dataclass(frozen=True, slots=True)
class ModelCopy:
    """A model's parameters and buffers at one step, on the CPU, shared with nothing."""

    name: str
    spec: ModelSpec
    step: int
    state: dict[str, torch.Tensor]


def copy_model(trainer: Trainer) -> ModelCopy:
    """Copy the trainer's state off its device; the only part of an export the worker runs."""
    state = {
        name: value.detach().to("cpu", copy=True)
        for name, value in trainer.module.state_dict().items()
    }
    return ModelCopy(trainer.name, trainer.spec, trainer.step, state)


def rebuild(copy: ModelCopy) -> nn.Module:
    """The copy's module on the CPU in eval mode, its parameters exactly the copied ones."""
    module = build_module(copy.spec, torch.device("cpu"))
    module.load_state_dict(copy.state)
    module.requires_grad_(False)
    # An exported program keeps the mode it was traced in (its module() refuses eval()).
    return module if copy.spec.architecture.kind == "exported" else module.eval()


def spec_json(spec: ModelSpec) -> str:
    """The spec as JSON, without init tensors: the exported parameters replace them."""
    data = spec.model_dump(mode="json", exclude={"init": {"tensors"}})
    return json.dumps(data, sort_keys=True)


def write(copy: ModelCopy, fmt: ExportFormat, directory: Path, max_batch_size: int = 0) -> Path:
    """Write the export into ``directory`` (existing, empty); returns its main file or folder.

    ``max_batch_size`` is Triton's (0: the model takes no batches from Triton's batcher,
    each request's first dimension is passed through as it is).
    """
    match fmt:
        case ExportFormat.SAFETENSORS:
            return write_safetensors(copy, directory / SAFETENSORS_FILE)
        case ExportFormat.PT2:
            return write_pt2(copy, directory / PT2_FILE)
        case ExportFormat.ONNX:
            return write_onnx(copy, directory / ONNX_FILE)
        case ExportFormat.TRITON:
            return write_triton(copy, directory, max_batch_size)
    raise InvalidArgument("format", f"unknown export format {fmt!r}")


def write_safetensors(copy: ModelCopy, path: Path) -> Path:
    """Parameters and buffers by name, with ``gradstream.spec`` / ``.step`` / ``.model``."""
    metadata = {
        "gradstream.model": copy.name,
        "gradstream.spec": spec_json(copy.spec),
        "gradstream.step": str(copy.step),
    }
    tensors = {name: t.contiguous() for name, t in copy.state.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def load_safetensors(path: Path) -> tuple[nn.Module, ModelSpec, int]:
    """The module a safetensors export holds, with its spec and step: the loader's side."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    spec = parse_spec(json.loads(metadata["gradstream.spec"]), "gradstream.spec")
    step = int(metadata["gradstream.step"])
    return rebuild(ModelCopy(metadata["gradstream.model"], spec, step, state)), spec, step


def _example(spec: ModelSpec) -> tuple[tuple[InputSpec, ...], tuple[torch.Tensor, ...], Any]:
    """The inputs, two rows of each (torch.export specializes a size of 0 or 1), and their
    dynamic dimensions: the rows, shared by all, and each size declared free."""
    inputs = model_inputs(spec)
    batch = torch.export.Dim("batch")
    dynamic = tuple(
        {
            0: batch,
            **{
                1 + i: torch.export.Dim(f"{spec_.name}_{1 + i}")
                for i, d in enumerate(spec_.shape)
                if d < 0
            },
        }
        for spec_ in inputs
    )
    return inputs, example_inputs(inputs, 2, DTYPES[spec.dtype]), dynamic


def _free_sizes(spec: ModelSpec) -> contextlib.AbstractContextManager[Any]:
    """Where an input has a free size (an id bag), trace sizes as free of 0/1 specializing.

    ``EmbeddingBag`` on (rows, bag) ids makes offsets with ``arange``; traced the usual
    way, that guards the row count to be at least 2, and one-row requests fail.
    """
    if any(d < 0 for i in model_inputs(spec) for d in i.shape):
        # install_config_module adds patch() at import time; its stubs do not know it.
        patched: contextlib.AbstractContextManager[Any] = fx_config.patch(  # type: ignore[attr-defined]
            backed_size_oblivious=True
        )
        return patched
    return contextlib.nullcontext()


def _dynamic_for(module: nn.Module, dynamic: Any) -> Any:
    """``dynamic`` shaped like ``module.forward``'s parameters: one entry per parameter, so
    inputs gathered by ``*inputs`` (``embedding_mlp``) take theirs as one tuple."""
    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    return (dynamic,) if kinds and kinds[0] is inspect.Parameter.VAR_POSITIONAL else dynamic


def _named_forward(module: nn.Module, names: list[str]) -> nn.Module:
    """Give a ``forward(*inputs)`` module a signature of the declared input names.

    torch.export names an archive's user inputs after ``forward``'s parameters: without
    this, ``embedding_mlp``'s would be ``inputs_0``... and the archive could not come back
    as an ``exported`` model taking the same named inputs. Set on the instance, so the
    parameter names stay the module's own.
    """
    signature = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    positional = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return positional(module, *signature.bind(*args, **kwargs).args)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    module.forward = forward
    return module


def write_pt2(copy: ModelCopy, path: Path) -> Path:
    """``torch.export`` of the eval-mode module; the row count is a dynamic dimension; the
    user inputs carry the model's declared input names."""
    module = rebuild(copy)
    inputs, example, dynamic = _example(copy.spec)
    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    if kinds and kinds[0] is inspect.Parameter.VAR_POSITIONAL:
        module = _named_forward(module, [i.name for i in inputs])
    with _EXPORT_LOCK, _free_sizes(copy.spec):
        program = torch.export.export(
            module, example, dynamic_shapes=_dynamic_for(module, dynamic), strict=False
        )
        torch.export.save(program, str(path))
    return path


def write_onnx(copy: ModelCopy, path: Path) -> Path:
    """``torch.onnx.export`` of the eval-mode module: input ``x``, output ``y``, rows dynamic."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; say so by name)
    except ImportError:
        raise FailedPrecondition(
            "onnx export needs the onnx and onnxscript packages: pip install 'gradstream[export]'"
        ) from None
    module = rebuild(copy)
    inputs, example, dynamic = _example(copy.spec)
    with _EXPORT_LOCK, _free_sizes(copy.spec):
        program: Any = torch.onnx.export(
            module,
            example,
            input_names=[i.name for i in inputs],
            output_names=["y"],
            dynamic_shapes=_dynamic_for(module, dynamic),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(path))
    return path


def triton_config(copy: ModelCopy, max_batch_size: int = 0) -> str:
    """config.pbtxt of a Triton model running the ONNX export on the onnxruntime backend.

    With ``max_batch_size`` > 0 Triton's dims leave out the batch dimension; with 0 they
    include it as -1 (any number of rows).
    """
    arch = copy.spec.architecture
    lead = [] if max_batch_size > 0 else [-1]

    def tensor(name: str, data_type: str, sizes: tuple[int, ...]) -> str:
        dims = ", ".join(str(d) for d in [*lead, *sizes])
        return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ {dims} ]\n  }}'

    inputs = ",\n".join(
        tensor(i.name, _TRITON_TYPES[copy.spec.dtype if i.kind == "float" else "integer"], i.shape)
        for i in model_inputs(copy.spec)
    )
    output = tensor("y", _TRITON_TYPES[copy.spec.dtype], (arch.out_features,))
    return (
        f'name: "{copy.name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{output}\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def write_triton(copy: ModelCopy, directory: Path, max_batch_size: int = 0) -> Path:
    """A Triton model repository holding one model at one version (version = step)."""
    model_dir = directory / copy.name
    version_dir = model_dir / str(copy.step)
    version_dir.mkdir(parents=True)
    write_onnx(copy, version_dir / ONNX_FILE)
    (model_dir / TRITON_CONFIG).write_text(triton_config(copy, max_batch_size))
    return directory


def files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted by path: the order an export is sent in."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def chunks(root: Path, chunk_bytes: int = CHUNK_BYTES) -> Generator[tuple[str, bytes], None, None]:
    """``(path, data)`` pieces of every file under ``root``; the path only on a file's first.

    An empty file is one piece with no data. Paths are relative and "/"-separated.
    """
    for path in files(root):
        name = path.relative_to(root).as_posix()
        with open(path, "rb") as f:
            first = True
            while True:
                data = f.read(chunk_bytes)
                if not data and not first:
                    break
                yield (name if first else "", data)
                first = False
                if len(data) < chunk_bytes:
                    break

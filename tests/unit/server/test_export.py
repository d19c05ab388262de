"""export.py: each format loads with the tool its users use and computes what Predict does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch

from gradstream.server import export as ex
from gradstream.server.batches import Batch
from gradstream.server.engine import Trainer, TrainOptions
from gradstream.server.spec import parse_spec

CPU = torch.device("cpu")
SPECS: dict[str, dict[str, Any]] = {
    "linear": {"architecture": {"kind": "linear", "in_features": 3, "out_features": 2}},
    "mlp": {
        "architecture": {
            "kind": "mlp",
            "in_features": 3,
            "out_features": 2,
            "hidden": [8, 5],
            "activation": "tanh",
        },
        "dtype": "float64",
    },
}


def _trained(kind: str, steps: int = 3) -> Trainer:
    spec = parse_spec({**SPECS[kind], "optimizer": {"kind": "sgd", "lr": 0.1}})
    trainer = Trainer(f"model-{kind}", spec, CPU)
    g = torch.Generator().manual_seed(0)
    dtype = trainer.module.state_dict()["weight" if kind == "linear" else "0.weight"].dtype
    options = TrainOptions()
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g, dtype=dtype)
        trainer.train(Batch(x, torch.randn(8, 2, generator=g, dtype=dtype)), options)
    assert trainer.step == steps
    return trainer


def _inputs(trainer: Trainer, rows: int) -> torch.Tensor:
    dtype = next(trainer.module.parameters()).dtype
    return torch.randn(rows, 3, generator=torch.Generator().manual_seed(rows), dtype=dtype)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_safetensors_rebuilds_the_module_bitwise(kind: str, tmp_path: Path) -> None:
    trainer = _trained(kind)
    path = ex.write(ex.copy_model(trainer), ex.ExportFormat.SAFETENSORS, tmp_path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(trainer.module.state_dict())
    assert metadata["gradstream.step"] == "3"
    assert json.loads(metadata["gradstream.spec"])["architecture"]["kind"] == kind
    module, spec, step = ex.load_safetensors(path)
    assert (spec, step) == (trainer.spec, 3)
    for rows in (1, 7):
        x = _inputs(trainer, rows)
        assert torch.equal(module(x), trainer.predict(x))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pt2_module_equals_predict_bitwise(kind: str, tmp_path: Path) -> None:
    trainer = _trained(kind)
    path = ex.write(ex.copy_model(trainer), ex.ExportFormat.PT2, tmp_path)
    loaded = torch.export.load(str(path)).module()
    for rows in (1, 2, 33):  # the row count is free, 1 included
        x = _inputs(trainer, rows)
        assert torch.equal(loaded(x), trainer.predict(x))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_onnx_passes_the_checker_and_runs_in_onnxruntime(kind: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    trainer = _trained(kind)
    path = ex.write(ex.copy_model(trainer), ex.ExportFormat.ONNX, tmp_path)
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y"]
    for rows in (1, 9):
        x = _inputs(trainer, rows)
        (y,) = session.run(["y"], {"x": x.numpy()})
        np.testing.assert_allclose(y, trainer.predict(x).numpy(), rtol=1e-5, atol=1e-5)


def _model_config(text: str) -> Any:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("max_batch_size", [0, 64])
def test_triton_repository_parses_as_model_config(
    kind: str, max_batch_size: int, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    trainer = _trained(kind)
    ex.write(ex.copy_model(trainer), ex.ExportFormat.TRITON, tmp_path, max_batch_size)
    name = trainer.name
    assert [p.relative_to(tmp_path).as_posix() for p in ex.files(tmp_path)] == [
        f"{name}/3/model.onnx",
        f"{name}/config.pbtxt",
    ]
    config = _model_config((tmp_path / name / "config.pbtxt").read_text())
    assert config.name == name
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == max_batch_size
    data_type = "TYPE_FP64" if trainer.spec.dtype == "float64" else "TYPE_FP32"
    lead = [] if max_batch_size else [-1]
    (x,) = config.input
    (y,) = config.output
    assert (x.name, list(x.dims)) == ("x", [*lead, 3])
    assert (y.name, list(y.dims)) == ("y", [*lead, 2])
    data_types = config.DESCRIPTOR.file.enum_types_by_name["DataType"]
    assert data_types.values_by_number[x.data_type].name == data_type
    assert data_types.values_by_number[y.data_type].name == data_type
    assert config.version_policy.latest.num_versions == 1
    session = ort.InferenceSession(str(tmp_path / name / "3" / "model.onnx"))
    inputs = _inputs(trainer, 4)
    (out,) = session.run(["y"], {"x": inputs.numpy()})
    np.testing.assert_allclose(out, trainer.predict(inputs).numpy(), rtol=1e-5, atol=1e-5)


def test_export_waits_for_nothing_but_the_copy() -> None:
    trainer = _trained("linear")
    copy = ex.copy_model(trainer)
    before = {k: v.clone() for k, v in copy.state.items()}
    trainer.train(Batch(torch.ones(2, 3), torch.ones(2, 2)), TrainOptions())
    # Training on after the copy leaves the copy as it was: nothing is shared.
    assert all(torch.equal(copy.state[k], before[k]) for k in before)
    assert copy.step == 3


def test_chunks_cut_every_file_and_name_it_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big").write_bytes(bytes(range(256)) * 10)  # 2560 bytes
    (tmp_path / "exact").write_bytes(b"x" * 1024)
    (tmp_path / "empty").write_bytes(b"")
    pieces = list(ex.chunks(tmp_path, chunk_bytes=1024))
    assert [(p, len(d)) for p, d in pieces] == [
        ("a/big", 1024),
        ("", 1024),
        ("", 512),
        ("empty", 0),
        ("exact", 1024),
    ]
    rebuilt: dict[str, bytes] = {}
    current = ""
    for path, data in pieces:
        current = path or current
        rebuilt[current] = rebuilt.get(current, b"") + data
    assert rebuilt["a/big"] == (tmp_path / "a" / "big").read_bytes()

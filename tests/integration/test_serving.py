"""Evaluate, ExportModel and continuous export on a real server, through the SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors
import torch
from prometheus_client import generate_latest

from gradstream.client import Client, GradstreamError
from gradstream.server.export import load_safetensors
from gradstream.server.listening import StartupRefused
from gradstream.server.main import BackgroundServer
from gradstream.server.publishing import versions
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from tests.conftest import server_settings

MLP = {
    "architecture": {"kind": "mlp", "in_features": 4, "out_features": 1, "hidden": [8]},
    "loss": {"kind": "bce_with_logits"},
    "optimizer": {"kind": "sgd", "lr": 0.1},
}
RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 4)).astype(np.float32)
Y = (X[:, :1] > 0).astype(np.float32)


def _trained(client: Client, name: str, spec: dict[str, Any] = MLP, steps: int = 5) -> None:
    client.create_model(name, spec)
    list(client.train(name, [(X, Y)] * steps))


def test_evaluate_matches_the_metrics_of_predict_and_steps_nothing(
    client: Client, name: str
) -> None:
    _trained(client, name)
    before = client.parameters(name)
    w = RNG.random(64).astype(np.float32) + 0.5
    batches = [(X[:20], Y[:20], w[:20]), (X[20:], Y[20:], w[20:])]
    got = client.evaluate(name, batches)
    assert client.get_model(name).step == 5
    after = client.parameters(name)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    logits = torch.from_numpy(client.predict(name, X)).double()
    y = torch.from_numpy(Y).double()
    weights = torch.from_numpy(w).double()
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert got["loss"] == pytest.approx(float((weights * per_row[:, 0]).sum() / weights.sum()))
    assert got["log_loss"] == pytest.approx(float(per_row.mean()))
    assert got["accuracy"] == pytest.approx(float(((logits > 0) == (y > 0.5)).double().mean()))
    p, n = logits[y > 0.5], logits[y < 0.5]
    pairs = (p[:, None] > n[None, :]).double().sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    assert got["roc_auc"] == pytest.approx(float(pairs / (p.numel() * n.numel())))
    assert (got["step"], got["rows"]) == (5, 64)


def test_evaluate_top_k_on_a_multiclass_model(client: Client, name: str) -> None:
    spec = {
        "architecture": {"kind": "linear", "in_features": 4, "out_features": 3},
        "loss": {"kind": "cross_entropy"},
    }
    client.create_model(name, spec)
    labels = RNG.integers(0, 3, 64)
    got = client.evaluate(name, [(X, labels)], top_k=[1, 3])
    assert got["top_3_accuracy"] == 1.0
    assert got["top_1_accuracy"] >= got["accuracy"] - 1e-12
    assert {"loss", "cross_entropy", "accuracy", "top_1_accuracy", "step", "rows"} <= set(got)


def test_evaluate_refuses_bad_input_naming_it(client: Client, name: str) -> None:
    _trained(client, name, steps=1)
    with pytest.raises(GradstreamError) as failure:
        client.evaluate(name, [(X, Y), (X[:, :3], Y)])
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "batches[1].x" in failure.value.details
    assert "(rows, 4)" in failure.value.details
    with pytest.raises(GradstreamError) as failure:
        client.evaluate(name, [(X, Y)], top_k=[1])
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "open.top_k" in failure.value.details
    with pytest.raises(GradstreamError) as failure:
        client.evaluate(name, [])
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(GradstreamError) as failure:
        client.evaluate("no-such-model", [(X, Y)])
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert client.get_model(name).step == 1


def test_evaluate_without_open_is_refused(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.Evaluate(iter([pb.EvaluateRequest()]), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open" in (failure.value.details() or "")


def test_evaluate_results_are_exported_to_prometheus(
    server: BackgroundServer, client: Client, name: str
) -> None:
    _trained(client, name, steps=2)
    got = client.evaluate(name, [(X, Y)])
    text = generate_latest(server.server.metrics.registry).decode()
    assert f'gradstream_eval_step{{model="{name}"}} 2.0' in text
    assert f'gradstream_eval_rows{{model="{name}"}} 64.0' in text
    for metric in ("loss", "log_loss", "accuracy", "roc_auc"):
        line = f'gradstream_eval_metric{{metric="{metric}",model="{name}"}} '
        (value,) = [ln.removeprefix(line) for ln in text.splitlines() if ln.startswith(line)]
        assert float(value) == pytest.approx(got[metric])
    client.delete_model(name)
    assert f'model="{name}"' not in generate_latest(server.server.metrics.registry).decode()


def test_predict_says_its_step(server: BackgroundServer, client: Client, name: str) -> None:
    _trained(client, name, steps=3)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        request = pb.PredictRequest(name=name)
        request.x.dtype = pb.DATA_TYPE_FLOAT32
        request.x.shape[:] = X.shape
        request.x.data = X.tobytes()
        assert stub.Predict(request, timeout=10).step == 3


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_every_export_format_computes_what_predict_does(
    client: Client, name: str, tmp_path: Path, kind: str
) -> None:
    spec = dict(MLP)
    if kind == "linear":
        spec["architecture"] = {"kind": "linear", "in_features": 4, "out_features": 1}
    _trained(client, name, spec, steps=4)
    expected = client.predict(name, X)

    (path,) = client.export(name, "safetensors", tmp_path / "model.safetensors")
    module, _, step = load_safetensors(path)
    assert step == 4
    with torch.no_grad():
        assert np.array_equal(module(torch.from_numpy(X)).numpy(), expected)

    (path,) = client.export(name, "pt2", tmp_path / "model.pt2")
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        assert np.array_equal(loaded(torch.from_numpy(X)).numpy(), expected)

    ort = pytest.importorskip("onnxruntime")
    (path,) = client.export(name, "onnx", tmp_path / "model.onnx")
    (y,) = ort.InferenceSession(str(path)).run(["y"], {"x": X})
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

    written = client.export(name, "triton", tmp_path / "repository")
    assert sorted(p.relative_to(tmp_path / "repository").as_posix() for p in written) == [
        f"{name}/4/model.onnx",
        f"{name}/config.pbtxt",
    ]
    (y,) = ort.InferenceSession(str(tmp_path / "repository" / name / "4" / "model.onnx")).run(
        ["y"], {"x": X}
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]


def test_export_refuses_an_unknown_format(
    server: BackgroundServer, client: Client, name: str
) -> None:
    with pytest.raises(ValueError, match="'zip' is not an export format"):
        client.export(name, "zip", "out")
    _trained(client, name, steps=1)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.ExportModel(pb.ExportModelRequest(name=name), timeout=10))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "format" in (failure.value.details() or "")
    with pytest.raises(GradstreamError) as missing:
        client.export("no-such-model", "pt2", "out")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_continuous_export_writes_versions_while_training(tmp_path: Path) -> None:
    settings = server_settings(
        export_dir=tmp_path, export_format="safetensors", export_every_steps=2, export_keep=2
    )
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("live", MLP)
        # One batch a message: the schedule is looked at after each message's steps.
        list(client.train("live", [(X, Y)] * 5, batches_per_message=1))
        publisher = server.server.publisher
        assert publisher is not None and publisher.flush(60)
        expected = client.parameters("live")
    # Steps 1, 3 and 5 are due; a copy still waiting when a newer one comes is dropped.
    kept = versions(tmp_path / "live")
    assert kept[-1] == 5 and len(kept) == 2 and set(kept) <= {1, 3, 5}
    with safetensors.safe_open(str(tmp_path / "live" / "5" / "model.safetensors"), "np") as f:
        assert all(np.array_equal(f.get_tensor(k), v) for k, v in expected.items())


def test_continuous_export_needs_a_schedule(tmp_path: Path) -> None:
    with pytest.raises(StartupRefused, match="export_every_steps"):
        BackgroundServer(server_settings(export_dir=tmp_path))

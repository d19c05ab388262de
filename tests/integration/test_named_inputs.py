"""Named inputs through the service: ``embedding_mlp`` and a two-input exported program train
bitwise like the textbook loop; every bad batch is refused naming the input, model unchanged.

Raw gRPC stubs: they can send what the SDK never would (both x and inputs, a name twice).
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from gradstream.client import Client, export_module
from gradstream.server.export import load_safetensors
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import from_proto, spec_to_proto, to_proto
from tests.conftest import server_settings

Arrays = dict[str, np.ndarray]
TABLES: list[dict[str, Any]] = [
    {"input": "user", "num_embeddings": 50, "dim": 4, "mode": "sum"},
    {"input": "item", "num_embeddings": 30, "dim": 3, "mode": "mean"},
]
DENSE = 5
SPEC: dict[str, Any] = {
    "architecture": {
        "kind": "embedding_mlp",
        "embeddings": TABLES,
        "dense_features": DENSE,
        "hidden": [8],
        "out_features": 1,
        "activation": "relu",
        "bias": True,
    },
    "init": {"seed": 11},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "adam", "lr": 0.01, "betas": [0.8, 0.99]},
    "schedule": {"kind": "step", "step_size": 2, "gamma": 0.5},
}


def inputs(rows: int, seed: int, bag: int = 3) -> Arrays:
    rng = np.random.default_rng(seed)
    out = {t["input"]: rng.integers(0, t["num_embeddings"], (rows, bag)) for t in TABLES}
    out["dense"] = rng.standard_normal((rows, DENSE)).astype(np.float32)
    return out


def target(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal((rows, 1)).astype(np.float32)


def named(arrays: Arrays) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=k, tensor=to_proto(v)) for k, v in arrays.items()]


def stub(client: Client) -> pb_grpc.TrainerServiceStub:
    return client._stub


def create(client: Client, name: str, spec: dict[str, Any], program: bytes = b"") -> pb.ModelInfo:
    request = pb.CreateModelRequest(name=name, spec=spec_to_proto(spec), program=program)
    return stub(client).CreateModel(request).model


def train(
    client: Client,
    name: str,
    batches: Sequence[pb.Batch],
    shared_memory: str = "",
    producer: str = "",
) -> list[pb.StepResult]:
    opened = pb.TrainOpen(model=name, shared_memory=shared_memory, producer_id=producer)
    requests = [
        pb.TrainRequest(open=opened),
        pb.TrainRequest(batches=batches),
    ]
    responses = list(stub(client).Train(iter(requests)))
    return [r for response in responses[1:] for r in response.results]


def predict(client: Client, name: str, arrays: Arrays) -> np.ndarray:
    return from_proto(
        stub(client).Predict(pb.PredictRequest(name=name, inputs=named(arrays))).y, "y"
    )


def state(
    server: BackgroundServer, client: Client, name: str, gradients: bool = True
) -> tuple[Any, Any]:
    """Parameter bytes through the API, optimizer state bytes and lr from the live trainer."""
    params = {n: a.tobytes() for n, a in client.parameters(name, gradients=gradients).items()}
    trainer = server.server.registry.get(name).trainer
    optimizer = trainer.optimizer
    opt = [
        {k: v.numpy().tobytes() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for s in (optimizer.state[p] for g in optimizer.param_groups for p in g["params"])
    ]
    return params, (opt, trainer.lr, trainer.step)


class Textbook(nn.Module):
    """Issue 14 item 3 written out: an EmbeddingBag per table, cat with dense, the mlp."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(t["num_embeddings"], t["dim"], mode=t["mode"]) for t in TABLES
        )
        self.mlp = nn.Sequential(nn.Linear(4 + 3 + DENSE, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, user: torch.Tensor, item: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        features = [self.tables[0](user), self.tables[1](item), dense]
        out: torch.Tensor = self.mlp(torch.cat(features, dim=1))
        return out


def textbook(batches: list[tuple[Arrays, np.ndarray]]) -> Textbook:
    torch.manual_seed(11)
    module = Textbook()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01, betas=(0.8, 0.99))
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for arrays, y in batches:
        optimizer.zero_grad()
        out = module(*(torch.from_numpy(arrays[k]) for k in ("user", "item", "dense")))
        nn.functional.mse_loss(out, torch.from_numpy(y)).backward()
        optimizer.step()
        schedule.step()
    return module


def textbook_parameters(module: Textbook) -> dict[str, nn.Parameter]:
    """The textbook module's parameters under gradstream's names."""
    renamed = {
        "tables.0.weight": "embeddings.user.weight",
        "tables.1.weight": "embeddings.item.weight",
    }
    return {renamed.get(k, k): v for k, v in module.named_parameters()}


def textbook_names(module: Textbook) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in textbook_parameters(module).items()}


def test_get_model_declares_the_inputs(client: Client, name: str) -> None:
    info = create(client, name, SPEC)
    declared = [(i.name, i.kind, list(i.shape)) for i in info.inputs]
    assert declared == [
        ("user", "integer", [-1]),
        ("item", "integer", [-1]),
        ("dense", "float", [DENSE]),
    ]
    got = stub(client).GetModel(pb.GetModelRequest(name=name)).model.inputs
    assert [(i.name, i.kind, list(i.shape)) for i in got] == declared
    listed = {m.name: m for m in stub(client).ListModels(pb.ListModelsRequest()).models}
    assert [i.name for i in listed[name].inputs] == ["user", "item", "dense"]
    linear = {"architecture": {"kind": "linear", "in_features": 3, "out_features": 1}}
    (x,) = create(client, name + "-x", linear).inputs
    assert (x.name, x.kind, list(x.shape)) == ("x", "float", [3])


def test_embedding_mlp_trains_bitwise_like_the_textbook_loop(client: Client, name: str) -> None:
    create(client, name, SPEC)
    batches = [(inputs(6 + i, i, bag=1 + i % 3), target(6 + i, i)) for i in range(6)]
    # Inputs in any order, ids as int64 or int32 (widened): the same batches.
    sent = [
        pb.Batch(inputs=named(dict(reversed(a.items())) if i % 2 else a), y=to_proto(y))
        for i, (a, y) in enumerate(batches)
    ]
    sent[3] = pb.Batch(
        inputs=named(
            {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in batches[3][0].items()}
        ),
        y=to_proto(batches[3][1]),
    )
    results = train(client, name, sent)
    assert [pb.Outcome.Name(r.outcome) for r in results] == ["OUTCOME_APPLIED"] * 6
    module = textbook(batches)
    got = client.parameters(name)
    want = textbook_names(module)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(torch.from_numpy(np.asarray(got[key])), value), key
    # Predict is module(...) on the trained parameters, bit for bit.
    probe = inputs(7, 99)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(probe[k]) for k in ("user", "item", "dense")))
    assert torch.equal(torch.from_numpy(predict(client, name, probe)), expected)


def test_compute_gradients_and_evaluate_take_named_inputs(client: Client, name: str) -> None:
    create(client, name, SPEC)
    arrays, y = inputs(5, 3), target(5, 3)
    response = stub(client).ComputeGradients(
        pb.ComputeGradientsRequest(name=name, inputs=named(arrays), y=to_proto(y))
    )
    torch.manual_seed(11)
    module = Textbook()
    out = module(*(torch.from_numpy(arrays[k]) for k in ("user", "item", "dense")))
    loss = nn.functional.mse_loss(out, torch.from_numpy(y))
    loss.backward()
    assert response.loss == loss.item()
    for key, param in textbook_parameters(module).items():
        assert param.grad is not None
        assert torch.equal(torch.from_numpy(from_proto(response.gradients[key], key)), param.grad)
    requests = [
        pb.EvaluateRequest(open=pb.EvaluateOpen(model=name)),
        pb.EvaluateRequest(batches=[pb.Batch(inputs=named(arrays), y=to_proto(y))]),
    ]
    evaluated = stub(client).Evaluate(iter(requests))
    assert evaluated.rows == 5
    assert evaluated.loss == pytest.approx(loss.item(), rel=1e-6)


def _replace(arrays: Arrays, **changes: Any) -> Arrays:
    out = dict(arrays)
    for key, value in changes.items():
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


_GOOD = inputs(4, 0)
_BAD_IDS = _GOOD["user"].copy()
_BAD_IDS[2, 1] = 50
_NEGATIVE = _GOOD["item"].copy()
_NEGATIVE[0, 0] = -1
# (case, inputs as (name, array) pairs, x, the field, words of the reason)
BAD: list[tuple[str, list[tuple[str, np.ndarray]], np.ndarray | None, str, str]] = [
    ("missing input", list(_replace(_GOOD, item=None).items()), None, "inputs", "misses item"),
    (
        "extra input",
        [*_GOOD.items(), ("age", np.ones((4, 1), np.float32))],
        None,
        "inputs[3].name",
        "'age' is not an input of this model",
    ),
    (
        "duplicate name",
        [*_GOOD.items(), ("user", _GOOD["user"])],
        None,
        "inputs[3].name",
        "'user' is given twice",
    ),
    (
        "float ids",
        list(_replace(_GOOD, user=_GOOD["user"].astype(np.float32)).items()),
        None,
        "inputs[user]",
        "has dtype float32; 'user' takes integer ids (int64, or int32 widened)",
    ),
    (
        "float16 ids",
        list(_replace(_GOOD, user=_GOOD["user"].astype(np.float16)).items()),
        None,
        "inputs[user]",
        "has dtype float16",
    ),
    (
        "id too large",
        list(_replace(_GOOD, user=_BAD_IDS).items()),
        None,
        "inputs[user]",
        "id 50 is out of range [0, 50)",
    ),
    (
        "negative id",
        list(_replace(_GOOD, item=_NEGATIVE).items()),
        None,
        "inputs[item]",
        "id -1 is out of range [0, 30)",
    ),
    (
        "1-D ids",
        list(_replace(_GOOD, user=_GOOD["user"][:, 0]).items()),
        None,
        "inputs[user]",
        "has shape [4], the model expects (rows, any)",
    ),
    (
        "3-D ids",
        list(_replace(_GOOD, user=_GOOD["user"].reshape(4, 3, 1)).items()),
        None,
        "inputs[user]",
        "has shape [4, 3, 1], the model expects (rows, any)",
    ),
    (
        "dense too wide",
        list(_replace(_GOOD, dense=np.ones((4, DENSE + 1), np.float32)).items()),
        None,
        "inputs[dense]",
        f"the model expects (rows, {DENSE})",
    ),
    (
        "integer dense",
        list(_replace(_GOOD, dense=np.ones((4, DENSE), np.int64)).items()),
        None,
        "inputs[dense]",
        "expected floating point",
    ),
    (
        "rows differ",
        list(_replace(_GOOD, item=_GOOD["item"][:3]).items()),
        None,
        "inputs[item]",
        "has 3 rows",
    ),
    (
        "x and inputs",
        list(_GOOD.items()),
        np.ones((4, 12), np.float32),
        "inputs",
        "set x or inputs, not both",
    ),
    ("x alone", [], np.ones((4, 12), np.float32), "x", "the model takes 3 inputs"),
]


def _pairs(pairs: list[tuple[str, np.ndarray]]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=k, tensor=to_proto(v)) for k, v in pairs]


@pytest.fixture
def trained(client: Client, name: str) -> str:
    create(client, name, SPEC)
    good = [pb.Batch(inputs=named(inputs(4, i)), y=to_proto(target(4, i))) for i in range(3)]
    assert len(train(client, name, good)) == 3  # Adam's state and the schedule have moved
    return name


@pytest.mark.parametrize(
    ("case", "pairs", "x", "field", "reason"), BAD, ids=[case[0] for case in BAD]
)
def test_a_bad_batch_is_refused_naming_the_input_and_changes_nothing(
    server: BackgroundServer,
    client: Client,
    trained: str,
    case: str,
    pairs: list[tuple[str, np.ndarray]],
    x: np.ndarray | None,
    field: str,
    reason: str,
) -> None:
    before = state(server, client, trained)
    y = to_proto(target(4, 0))
    x_proto = None if x is None else to_proto(x)
    batch = pb.Batch(x=x_proto, inputs=_pairs(pairs), y=y)
    (result,) = train(client, trained, [batch])
    assert pb.Outcome.Name(result.outcome) == "OUTCOME_REJECTED"
    assert result.reason.startswith(f"batches[0].{field}: "), result.reason
    assert reason in result.reason
    evaluated = [
        pb.EvaluateRequest(open=pb.EvaluateOpen(model=trained)),
        pb.EvaluateRequest(batches=[batch]),
    ]
    for call, prefix in (
        (
            lambda: stub(client).Predict(
                pb.PredictRequest(name=trained, x=x_proto, inputs=_pairs(pairs))
            ),
            "",
        ),
        (
            lambda: stub(client).ComputeGradients(
                pb.ComputeGradientsRequest(name=trained, x=x_proto, inputs=_pairs(pairs), y=y)
            ),
            "",
        ),
        (lambda: stub(client).Evaluate(iter(evaluated)), "batches[0]."),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details() or ""
        assert details.startswith(f"{prefix}{field}: "), details
        assert reason in details
    assert state(server, client, trained) == before
    # The stream and the model go on.
    after = train(client, trained, [pb.Batch(inputs=named(_GOOD), y=y)])
    assert [pb.Outcome.Name(r.outcome) for r in after] == ["OUTCOME_APPLIED"]


def test_a_single_input_model_takes_x_or_inputs_named_x(client: Client, name: str) -> None:
    linear = {
        "architecture": {"kind": "linear", "in_features": 3, "out_features": 1},
        "init": {"kind": "zeros"},
        "optimizer": {"lr": 0.1},
    }
    create(client, name + "-a", linear)
    create(client, name + "-b", linear)
    x, y = np.ones((2, 3), np.float32), np.ones((2, 1), np.float32)
    train(client, name + "-a", [pb.Batch(x=to_proto(x), y=to_proto(y))])
    train(client, name + "-b", [pb.Batch(inputs=named({"x": x}), y=to_proto(y))])
    a, b = client.parameters(name + "-a"), client.parameters(name + "-b")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    (result,) = train(client, name + "-a", [pb.Batch(inputs=named({"z": x}), y=to_proto(y))])
    assert result.reason == (
        "batches[0].inputs[0].name: 'z' is not an input of this model; it takes x (float (rows, 3))"
    )


def test_named_inputs_may_lie_in_shared_memory(client: Client, name: str) -> None:
    create(client, name, SPEC)
    create(client, name + "-ref", SPEC)
    arrays, y = inputs(9, 5), target(9, 5)
    segment = f"gradstream-test-{uuid.uuid4().hex[:12]}"
    path = Path("/dev/shm") / segment
    blobs = [np.ascontiguousarray(v).tobytes() for v in arrays.values()]
    path.write_bytes(b"".join(blobs))
    try:
        tensors, offset = [], 0
        for (key, value), blob in zip(arrays.items(), blobs, strict=True):
            tensor = to_proto(value)
            tensor.data = b""
            tensor.shared.offset, tensor.shared.length = offset, len(blob)
            tensors.append(pb.NamedTensor(name=key, tensor=tensor))
            offset += len(blob)
        results = train(client, name, [pb.Batch(inputs=tensors, y=to_proto(y))], segment)
        # An id out of range in the segment is refused without echoing the segment's bytes.
        bad = arrays["user"].copy()
        bad[0, 0] = 77
        os.pwrite(os.open(path, os.O_WRONLY), bad.tobytes(), 0)
        refused = train(client, name, [pb.Batch(inputs=tensors, y=to_proto(y))], segment)
    finally:
        path.unlink()
    assert [pb.Outcome.Name(r.outcome) for r in results] == ["OUTCOME_APPLIED"]
    train(client, name + "-ref", [pb.Batch(inputs=named(arrays), y=to_proto(y))])
    a, b = client.parameters(name), client.parameters(name + "-ref")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    (rejected,) = refused
    assert rejected.reason == "batches[0].inputs[user]: an id is out of range [0, 50)"


def test_embedding_mlp_restores_from_its_checkpoint_and_its_producer_resumes(
    tmp_path: Path,
) -> None:
    # Predict through the worker queue here (no Predict threads): the other path.
    settings = server_settings(checkpoint_dir=tmp_path, checkpoint_every_steps=1, predict_threads=0)
    batches = [
        pb.Batch(inputs=named(inputs(4, i)), y=to_proto(target(4, i)), sequence=i + 1)
        for i in range(6)
    ]
    with BackgroundServer(settings) as server, Client(server.target) as client:
        create(client, "ctr", SPEC)
        train(client, "ctr", batches[:3], producer="p")
        before = state(server, client, "ctr", gradients=False)  # a restore keeps no .grad
    with BackgroundServer(settings) as server, Client(server.target) as client:
        assert state(server, client, "ctr", gradients=False) == before
        model = stub(client).GetModel(pb.GetModelRequest(name="ctr")).model
        assert [i.name for i in model.inputs] == ["user", "item", "dense"]
        # The producer re-sends from its start: what the checkpoint holds is DUPLICATE.
        results = train(client, "ctr", batches, producer="p")
        assert [pb.Outcome.Name(r.outcome) for r in results] == [
            *["OUTCOME_DUPLICATE"] * 3,
            *["OUTCOME_APPLIED"] * 3,
        ]
        resumed = client.parameters("ctr")
        probe = inputs(3, 77)
        served = predict(client, "ctr", probe)
    module = textbook([(inputs(4, i), target(4, i)) for i in range(6)])
    for key, value in textbook_names(module).items():
        assert torch.equal(torch.from_numpy(np.asarray(resumed[key])), value), key
    with torch.no_grad():
        want = module(*(torch.from_numpy(probe[k]) for k in ("user", "item", "dense")))
    assert torch.equal(torch.from_numpy(served), want)


class Scored(nn.Module):
    """A two-input program: a float feature row and a bag of integer ids."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(20, 3)
        self.linear = nn.Linear(4 + 3, 2)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(torch.cat([features, self.table(ids).sum(1)], dim=1))
        return out


def _scored_archive() -> bytes:
    torch.manual_seed(5)
    return export_module(Scored(), (torch.randn(4, 4), torch.randint(0, 20, (4, 3))))


def test_an_exported_program_with_a_float_and_an_id_input_trains_bitwise(
    client: Client, name: str
) -> None:
    archive = _scored_archive()
    spec = {"architecture": {"kind": "exported"}, "optimizer": {"kind": "adam", "lr": 0.05}}
    info = create(client, name, spec, archive)
    assert [(i.name, i.kind, list(i.shape)) for i in info.inputs] == [
        ("features", "float", [4]),
        ("ids", "integer", [3]),
    ]
    rng = np.random.default_rng(2)
    batches: list[tuple[Arrays, np.ndarray]] = [
        (
            {
                "features": rng.standard_normal((5, 4)).astype(np.float32),
                "ids": rng.integers(0, 20, (5, 3)),
            },
            rng.standard_normal((5, 2)).astype(np.float32),
        )
        for _ in range(4)
    ]
    results = train(client, name, [pb.Batch(inputs=named(a), y=to_proto(y)) for a, y in batches])
    assert [pb.Outcome.Name(r.outcome) for r in results] == ["OUTCOME_APPLIED"] * 4
    module = torch.export.load(io.BytesIO(archive)).module()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for arrays, y in batches:
        optimizer.zero_grad()
        out = module(torch.from_numpy(arrays["features"]), torch.from_numpy(arrays["ids"]))
        nn.functional.mse_loss(out, torch.from_numpy(y)).backward()
        optimizer.step()
    got = client.parameters(name)
    for key, value in module.named_parameters():
        assert torch.equal(torch.from_numpy(np.asarray(got[key])), value.detach()), key
    probe = batches[0][0]
    with torch.no_grad():
        want = module(torch.from_numpy(probe["features"]), torch.from_numpy(probe["ids"]))
    assert torch.equal(torch.from_numpy(predict(client, name, probe)), want)
    (refused,) = train(
        client,
        name,
        [
            pb.Batch(
                inputs=named({**probe, "ids": probe["ids"].astype(np.float64)}),
                y=to_proto(batches[0][1]),
            )
        ],
    )
    assert refused.reason.startswith("batches[0].inputs[ids]: has dtype float64")
    # Ids that index the program's table directly are checked against its rows.
    (refused,) = train(
        client,
        name,
        [pb.Batch(inputs=named({**probe, "ids": probe["ids"] + 20}), y=to_proto(batches[0][1]))],
    )
    high = int(probe["ids"].max()) + 20
    assert refused.reason == f"batches[0].inputs[ids]: id {high} is out of range [0, 20)"
    assert all(got[k].tobytes() == v.tobytes() for k, v in client.parameters(name).items())


def test_every_export_format_of_embedding_mlp_computes_what_predict_does(
    client: Client, name: str, tmp_path: Path
) -> None:
    create(client, name, SPEC)
    train(
        client,
        name,
        [pb.Batch(inputs=named(inputs(4, i)), y=to_proto(target(4, i))) for i in range(3)],
    )
    probes = [inputs(rows, 40 + rows, bag) for rows, bag in ((1, 1), (5, 2), (7, 4))]
    expected = [predict(client, name, p) for p in probes]
    order = ("user", "item", "dense")

    (path,) = client.export(name, "safetensors", tmp_path / "model.safetensors")
    module, _, step = load_safetensors(path)
    assert step == 3
    (path,) = client.export(name, "pt2", tmp_path / "model.pt2")
    loaded = torch.export.load(str(path)).module()
    for probe, want in zip(probes, expected, strict=True):
        tensors = [torch.from_numpy(probe[k]) for k in order]
        with torch.no_grad():
            assert np.array_equal(module(*tensors).numpy(), want)
            assert np.array_equal(loaded(*tensors).numpy(), want)  # rows and bags are free
    # The archive's user inputs carry the declared names, so it comes back as an
    # `exported` model that takes the same named inputs and predicts the same.
    program = torch.export.load(str(path))
    assert program.graph_signature.user_inputs == order
    back = {**SPEC, "architecture": {"kind": "exported"}, "schedule": None}
    info = create(client, f"{name}-back", {k: v for k, v in back.items() if v}, path.read_bytes())
    assert [i.name for i in info.inputs] == list(order)
    for probe, want in zip(probes, expected, strict=True):
        assert np.array_equal(predict(client, f"{name}-back", probe), want)

    ort = pytest.importorskip("onnxruntime")
    (path,) = client.export(name, "onnx", tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("user", "tensor(int64)"),
        ("item", "tensor(int64)"),
        ("dense", "tensor(float)"),
    ]
    for probe, want in zip(probes, expected, strict=True):
        (y,) = session.run(["y"], probe)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)

    client.export(name, "triton", tmp_path / "repository")
    config = (tmp_path / "repository" / name / "config.pbtxt").read_text()
    assert (
        'input [\n  {\n    name: "user"\n    data_type: TYPE_INT64\n    dims: [ -1, -1 ]\n  },\n'
        '  {\n    name: "item"\n    data_type: TYPE_INT64\n    dims: [ -1, -1 ]\n  },\n'
        f'  {{\n    name: "dense"\n    data_type: TYPE_FP32\n    dims: [ -1, {DENSE} ]\n  }}\n]\n'
    ) in config
    triton = ort.InferenceSession(str(tmp_path / "repository" / name / "3" / "model.onnx"))
    (y,) = triton.run(["y"], probes[1])
    np.testing.assert_allclose(y, expected[1], rtol=1e-5, atol=1e-5)

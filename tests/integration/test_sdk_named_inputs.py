"""The SDK's named inputs against the real server: every batch form, every path, bitwise.

``embedding_mlp`` trained from ``(inputs, y)`` and ``(inputs, y, sample_weight)`` batches
through the plain stream, the exactly-once producer and shared memory ends with the
parameters of the textbook loop (module, loss, Adam, schedule written out by hand);
``predict`` and ``gradients`` with a dict equal that module's forward and backward.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gradstream.client import BatchRejected, Client

TABLES = [("user", 40, 3, "sum"), ("item", 20, 2, "mean"), ("category", 6, 2, "max")]
DENSE = 3
SPEC: dict[str, Any] = {
    "architecture": {
        "kind": "embedding_mlp",
        "embeddings": [
            {"input": n, "num_embeddings": size, "dim": dim, "mode": mode}
            for n, size, dim, mode in TABLES
        ],
        "dense_features": DENSE,
        "hidden": [5],
        "out_features": 1,
        "activation": "tanh",
    },
    "init": {"kind": "seed", "seed": 3},
    "loss": {"kind": "bce_with_logits"},
    "optimizer": {"kind": "adam", "lr": 0.05},
    "schedule": {
        "kind": "sequential",
        "schedulers": [
            {"kind": "linear", "start_factor": 0.25, "total_iters": 4},
            {"kind": "cosine_annealing", "t_max": 20, "eta_min": 0.001},
        ],
        "milestones": [4],
    },
}


class Textbook(nn.Module):
    """embedding_mlp as a user would write it: one EmbeddingBag per table, cat, an mlp."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {n: nn.EmbeddingBag(size, dim, mode=mode) for n, size, dim, mode in TABLES}
        )
        width = sum(dim for _, _, dim, _ in TABLES) + DENSE
        self.mlp = nn.Sequential(nn.Linear(width, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        features = [self.embeddings[n](inputs[n]) for n, _, _, _ in TABLES]
        out: torch.Tensor = self.mlp(torch.cat([*features, inputs["dense"]], dim=1))
        return out


def _textbook(initial: dict[str, np.ndarray]) -> Textbook:
    module = Textbook()
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(initial[n].copy()))
    return module


def _loss(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return F.binary_cross_entropy_with_logits(out, y)
    per_row = F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1)
    return (w * per_row).sum() / w.sum()


def _tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}


def textbook_loop(
    initial: dict[str, np.ndarray], batches: list[tuple[Any, ...]]
) -> dict[str, np.ndarray]:
    """zero_grad -> forward -> loss -> backward -> Adam step -> scheduler step, per batch."""
    module = _textbook(initial)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler
    scheduler = sched.SequentialLR(
        optimizer,
        [
            sched.LinearLR(optimizer, start_factor=0.25, total_iters=4),
            sched.CosineAnnealingLR(optimizer, T_max=20, eta_min=0.001),
        ],
        milestones=[4],
    )
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        w = torch.from_numpy(batch[2]) if len(batch) == 3 else None
        _loss(module(_tensors(batch[0])), torch.from_numpy(batch[1]), w).backward()
        optimizer.step()
        scheduler.step()
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


def make_batches(
    count: int, weighted: bool, seed: int = 0, rows: tuple[int, int] = (1, 9)
) -> list[tuple[Any, ...]]:
    """Batches of ids (int64 and int32, bags of varying length) and dense features.

    The dict lists dense first and the tables out of their declared order: the server
    takes inputs by name.
    """
    rng = np.random.default_rng(seed)
    out: list[tuple[Any, ...]] = []
    for _ in range(count):
        n = int(rng.integers(*rows))
        inputs = {
            "dense": rng.normal(size=(n, DENSE)).astype(np.float32),
            "item": rng.integers(0, 20, (n, int(rng.integers(1, 4)))).astype(np.int32),
            "user": rng.integers(0, 40, (n, 1)),
            "category": rng.integers(0, 6, (n, 2)),
        }
        y = rng.integers(0, 2, (n, 1)).astype(np.float32)
        w = rng.uniform(0.1, 2.0, n).astype(np.float32)
        out.append((inputs, y, w) if weighted else (inputs, y))
    return out


def _same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for n, want in expected.items():
        assert got[n].dtype == want.dtype
        assert got[n].tobytes() == want.tobytes(), n


PATHS: dict[str, dict[str, Any]] = {
    "plain": {"batches_per_message": 3},
    "producer": {"batches_per_message": 3, "producer_id": "named-producer"},
    "shared_memory": {"batches_per_message": 3, "shared_memory": True, "window_bytes": 16384},
    "producer_shared_memory": {
        "batches_per_message": 3,
        "shared_memory": True,
        "window_bytes": 16384,
        "producer_id": "named-shm-producer",
    },
}


@pytest.mark.parametrize("weighted", [False, True], ids=["inputs_y", "inputs_y_w"])
@pytest.mark.parametrize("path", list(PATHS))
def test_named_input_batches_train_like_the_textbook_loop_bitwise(
    client: Client, name: str, path: str, weighted: bool
) -> None:
    client.create_model(name, SPEC)
    initial = client.parameters(name)
    batches = make_batches(24, weighted, seed=len(path))
    results = list(client.train(name, batches, **PATHS[path]))
    assert [r.outcome for r in results] == ["APPLIED"] * len(batches)
    _same(client.parameters(name), textbook_loop(initial, batches))


def test_large_named_batches_take_the_in_place_path_bitwise(client: Client, name: str) -> None:
    # Each message is far above the server's zero-copy threshold, the data aligned in it.
    client.create_model(name, SPEC)
    initial = client.parameters(name)
    batches = make_batches(3, weighted=True, seed=9, rows=(6000, 6001))
    results = list(client.train(name, batches, batches_per_message=1))
    assert [r.outcome for r in results] == ["APPLIED"] * 3
    _same(client.parameters(name), textbook_loop(initial, batches))


def test_predict_and_gradients_take_a_dict_of_inputs(client: Client, name: str) -> None:
    client.create_model(name, SPEC)
    list(client.train(name, make_batches(5, weighted=False, seed=2)))
    module = _textbook(client.parameters(name))
    inputs, y, w = make_batches(1, weighted=True, seed=5, rows=(7, 8))[0]
    with torch.no_grad():
        expected = module(_tensors(inputs)).numpy()
    assert client.predict(name, inputs).tobytes() == expected.tobytes()

    _loss(module(_tensors(inputs)), torch.from_numpy(y), torch.from_numpy(w)).backward()
    got = client.gradients(name, inputs, y, sample_weight=w)
    _same(got, {n: p.grad.numpy() for n, p in module.named_parameters() if p.grad is not None})

    module.zero_grad(set_to_none=True)
    vector = np.linspace(-1, 1, 7, dtype=np.float32).reshape(7, 1)
    module(_tensors(inputs)).backward(torch.from_numpy(vector))
    got = client.gradients(name, inputs, grad_output=vector)
    _same(got, {n: p.grad.numpy() for n, p in module.named_parameters() if p.grad is not None})


def test_evaluate_takes_named_inputs(client: Client, name: str) -> None:
    client.create_model(name, SPEC)
    batches = make_batches(4, weighted=False, seed=8)
    result = client.evaluate(name, batches)
    module = _textbook(client.parameters(name))
    with torch.no_grad():
        out = torch.cat([module(_tensors(b[0])) for b in batches])
        y = torch.cat([torch.from_numpy(b[1]) for b in batches])
        expected = F.binary_cross_entropy_with_logits(out.double(), y.double()).item()
    assert result["rows"] == len(y) and result["step"] == 0
    assert result["log_loss"] == pytest.approx(expected, rel=1e-6)


def test_get_model_lists_the_inputs(client: Client, name: str) -> None:
    info = client.create_model(name, SPEC)
    assert [(i.name, i.kind, i.shape) for i in info.inputs] == [
        ("user", "integer", (-1,)),
        ("item", "integer", (-1,)),
        ("category", "integer", (-1,)),
        ("dense", "float", (DENSE,)),
    ]
    assert client.get_model(name).inputs == info.inputs


def test_a_single_input_model_takes_x_as_a_dict_too(client: Client, name: str) -> None:
    spec = {
        "architecture": {"kind": "mlp", "in_features": 3, "hidden": [4], "out_features": 1},
        "init": {"kind": "seed", "seed": 1},
    }
    client.create_model(name + "-x", spec)
    client.create_model(name + "-dict", spec)
    rng = np.random.default_rng(0)
    data = [
        (rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 1)).astype(np.float32))
        for _ in range(6)
    ]
    list(client.train(name + "-x", data))
    list(client.train(name + "-dict", [({"x": x}, y) for x, y in data]))
    _same(client.parameters(name + "-dict"), client.parameters(name + "-x"))
    x = data[0][0]
    assert client.predict(name + "-dict", {"x": x}).tobytes() == (
        client.predict(name + "-x", x).tobytes()
    )


def test_malformed_inputs_fail_on_the_client_and_the_model_is_unchanged(
    client: Client, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    client.create_model(name, SPEC)
    before = client.parameters(name)
    inputs, y = make_batches(1, weighted=False)[0]
    with pytest.raises(TypeError, match=re.escape("batch 0: inputs: key 7 (int) is not a string")):
        list(client.train(name, [({**inputs, 7: inputs["user"]}, y), (inputs, y)]))
    with pytest.raises(ValueError, match="batch 0: y is None"):
        list(client.train(name, [(inputs, None)]))
    with pytest.raises(TypeError, match="key 7"):
        client.predict(name, {**inputs, 7: inputs["user"]})
    with pytest.raises(ValueError, match=re.escape("batch 0: y is None")):
        client.evaluate(name, [(inputs, None)])
    # The caller sees the error itself; gRPC has nothing to log about its request iterator.
    assert not [r for r in caplog.records if r.name.startswith("grpc")]
    # What the server checks: an input missing is that batch's REJECTED, naming it.
    missing = {k: v for k, v in inputs.items() if k != "item"}
    with pytest.raises(BatchRejected, match="item"):
        list(client.train(name, [(missing, y)]))
    info = client.get_model(name)
    assert info.step == 0
    _same(client.parameters(name), before)

"""Training through the service equals the plain PyTorch loop, bitwise, on CPU float32/64."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gradstream.client import Client

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
LOSSES = ["mse", "l1", "huber", "cross_entropy", "bce_with_logits"]


def plain_module(arch: dict[str, Any]) -> nn.Module:
    """The architecture written out by hand, as a user would in a notebook."""
    if arch["kind"] == "linear":
        return nn.Linear(arch["in_features"], arch["out_features"], bias=arch["bias"])
    widths = [arch["in_features"], *arch["hidden"], arch["out_features"]]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(ACTIVATIONS[arch["activation"]]())
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=arch["bias"]))
    return nn.Sequential(*layers)


def plain_loss(
    loss: dict[str, Any], out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None
) -> torch.Tensor:
    """DESIGN.md's formula: sum(w * l_i) / sum(w) for mean, l_i reduced over the row."""
    kind, reduction = loss["kind"], loss["reduction"]
    fn: Any = {
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "huber": lambda a, b, reduction: F.huber_loss(
            a, b, reduction=reduction, delta=loss["delta"]
        ),
        "cross_entropy": F.cross_entropy,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
    }[kind]
    if w is None:
        return fn(out, y, reduction=reduction)  # type: ignore[no-any-return]
    per = fn(out, y, reduction="none")
    if per.ndim > 1:
        dims = tuple(range(1, per.ndim))
        per = per.mean(dims) if reduction == "mean" else per.sum(dims)
    total: torch.Tensor = (w * per).sum()
    return total / w.sum() if reduction == "mean" else total


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["linear", "mlp"]))
    loss_kind = draw(st.sampled_from(LOSSES))
    in_f = draw(st.integers(1, 5))
    out_f = draw(st.integers(2 if loss_kind == "cross_entropy" else 1, 4))
    arch: dict[str, Any] = {
        "kind": kind,
        "in_features": in_f,
        "out_features": out_f,
        "bias": draw(st.booleans()),
        "hidden": draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
        if kind == "mlp"
        else [],
        "activation": draw(st.sampled_from(sorted(ACTIVATIONS))),
    }
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    optimizer = {
        "kind": "sgd",
        "lr": draw(st.sampled_from([0.001, 0.01, 0.05])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-3])),
        "nesterov": nesterov,
        "maximize": draw(st.booleans()),
        "foreach": draw(st.sampled_from([None, True, False])),
    }
    module = plain_module(arch)
    names = [n for n, _ in module.named_parameters()]
    frozen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1))
    spec = {
        "architecture": arch,
        "init": {"kind": "seed", "seed": draw(st.integers(0, 2**31))},
        "loss": {
            "kind": loss_kind,
            "reduction": draw(st.sampled_from(["mean", "sum"])),
            "delta": draw(st.sampled_from([0.5, 1.0])),
        },
        "optimizer": optimizer,
        "accumulate_steps": draw(st.integers(1, 4)),
        "dtype": draw(st.sampled_from(["float32", "float64"])),
        "frozen": frozen,
    }
    return {
        "spec": spec,
        "weighted": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31)),
        "batches": draw(st.integers(1, 9)),
        "per_message": draw(st.integers(1, 4)),
    }


def make_batches(
    spec: dict[str, Any], weighted: bool, count: int, seed: int
) -> list[tuple[Any, ...]]:
    rng = np.random.default_rng(seed)
    arch, loss = spec["architecture"], spec["loss"]["kind"]
    dtype = np.float32 if spec["dtype"] == "float32" else np.float64
    batches: list[tuple[Any, ...]] = []
    for _ in range(count):
        rows = int(rng.integers(1, 7))
        x = rng.uniform(-1, 1, (rows, arch["in_features"])).astype(dtype)
        if loss == "cross_entropy":
            y: Any = rng.integers(0, arch["out_features"], rows).astype(np.int64)
        elif loss == "bce_with_logits":
            y = rng.integers(0, 2, (rows, arch["out_features"])).astype(dtype)
        else:
            y = rng.uniform(-1, 1, (rows, arch["out_features"])).astype(dtype)
        w = rng.uniform(0.1, 2.0, rows).astype(dtype) if weighted else None
        batches.append((x, y) if w is None else (x, y, w))
    return batches


def plain_loop(
    spec: dict[str, Any], initial: dict[str, np.ndarray], batches: list[tuple[Any, ...]]
) -> dict[str, np.ndarray]:
    """zero_grad(set_to_none=True) -> forward -> loss -> backward (x k) -> step."""
    dtype = torch.float32 if spec["dtype"] == "float32" else torch.float64
    module = plain_module(spec["architecture"]).to(dtype)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(initial[n].copy()))
    for n, p in module.named_parameters():
        p.requires_grad_(n not in spec["frozen"])
    opt = spec["optimizer"]
    optimizer = torch.optim.SGD(
        module.parameters(),
        lr=opt["lr"],
        momentum=opt["momentum"],
        dampening=opt["dampening"],
        weight_decay=opt["weight_decay"],
        nesterov=opt["nesterov"],
        maximize=opt["maximize"],
        foreach=opt["foreach"],
    )
    k = spec["accumulate_steps"]
    for i, batch in enumerate(batches):
        if i % k == 0:
            optimizer.zero_grad(set_to_none=True)
        x, y = torch.from_numpy(batch[0]), torch.from_numpy(batch[1])
        w = torch.from_numpy(batch[2]) if len(batch) == 3 else None
        plain_loss(spec["loss"], module(x), y, w).backward()
        if i % k == k - 1:
            optimizer.step()
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=scenarios())
def test_service_equals_plain_pytorch_loop_bitwise(client: Client, case: dict[str, Any]) -> None:
    spec = case["spec"]
    name = f"exact-{abs(hash(repr(case))) % 10**12}"
    client.create_model(name, spec)
    try:
        initial = client.parameters(name)
        batches = make_batches(spec, case["weighted"], case["batches"], case["seed"])
        results = list(client.train(name, batches, batches_per_message=case["per_message"]))
        k = spec["accumulate_steps"]
        assert [r.outcome for r in results] == [
            "APPLIED" if i % k == k - 1 else "ACCUMULATED" for i in range(len(batches))
        ]
        got = client.parameters(name)
        expected = plain_loop(spec, initial, batches)
        assert got.keys() == expected.keys()
        for n in expected:
            assert got[n].dtype == expected[n].dtype
            assert got[n].tobytes() == expected[n].tobytes(), n
        for n in spec["frozen"]:
            assert got[n].tobytes() == initial[n].tobytes()
    finally:
        client.delete_model(name)

"""Training through the service equals the plain PyTorch loop, bitwise, on CPU float32/64."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gradstream.client import Client, export_module
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
LOSSES = ["mse", "l1", "huber", "cross_entropy", "bce_with_logits"]
OPTIMIZERS: dict[str, Any] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


class PlainEmbeddingMLP(nn.Module):
    """``embedding_mlp`` as issue 14 item 3 says: an ``EmbeddingBag`` per table on its 2-D
    ids, ``cat([table_1(ids_1), ..., table_k(ids_k), dense], dim=1)``, then the mlp."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                t["input"]: nn.EmbeddingBag(t["num_embeddings"], t["dim"], mode=t["mode"])
                for t in arch["embeddings"]
            }
        )
        width = sum(t["dim"] for t in arch["embeddings"]) + arch["dense_features"]
        self.mlp = plain_module({**arch, "kind": "mlp", "in_features": width})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        features = [table(inputs[name]) for name, table in self.embeddings.items()]
        if "dense" in inputs:
            features.append(inputs["dense"])
        out: torch.Tensor = self.mlp(torch.cat(features, dim=1))
        return out


class FeaturesAndIds(nn.Module):
    """A user's two-input network for an ``exported`` program: floats and a bag of ids."""

    def __init__(self, arch: dict[str, Any], table: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(table, dim)
        self.mlp = plain_module({**arch, "kind": "mlp", "in_features": arch["in_features"] + dim})

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(torch.cat([features, self.table(ids).sum(1)], dim=1))
        return out


def plain_module(arch: dict[str, Any]) -> nn.Module:
    """The architecture written out by hand, as a user would in a notebook."""
    if arch["kind"] == "embedding_mlp":
        return PlainEmbeddingMLP(arch)
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
def optimizers(draw: st.DrawFn) -> dict[str, Any]:
    """Any optimizer with random values of its options (torch's names)."""
    kind = draw(st.sampled_from(sorted(OPTIMIZERS)))
    lr = draw(st.sampled_from([0.001, 0.01, 0.05]))
    decay = draw(st.sampled_from([0.0, 1e-3]))
    foreach = draw(st.sampled_from([None, True, False]))
    common = {"kind": kind, "lr": lr, "maximize": draw(st.booleans()), "foreach": foreach}
    fused = None if foreach or kind == "rmsprop" else draw(st.sampled_from([None, False, True]))
    if kind != "rmsprop":
        common["fused"] = fused
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        return common | {
            "momentum": momentum,
            "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1])),
            "weight_decay": decay,
            "nesterov": nesterov,
        }
    if kind in ("adam", "adamw"):
        options = {
            "betas": [draw(st.sampled_from([0.8, 0.9])), draw(st.sampled_from([0.99, 0.999]))],
            "eps": draw(st.sampled_from([1e-8, 1e-6])),
            "weight_decay": draw(st.sampled_from([0.0, 1e-3, 1e-2])),
            "amsgrad": draw(st.booleans()),
        }
        if kind == "adam":
            options["decoupled_weight_decay"] = draw(st.booleans())
        return common | options
    if kind == "adagrad":
        return common | {
            "lr_decay": draw(st.sampled_from([0.0, 0.01])),
            "weight_decay": decay,
            "initial_accumulator_value": draw(st.sampled_from([0.0, 0.1])),
            "eps": draw(st.sampled_from([1e-10, 1e-6])),
        }
    return common | {
        "alpha": draw(st.sampled_from([0.9, 0.99])),
        "eps": draw(st.sampled_from([1e-8, 1e-6])),
        "weight_decay": decay,
        "momentum": draw(st.sampled_from([0.0, 0.5])),
        "centered": draw(st.booleans()),
    }


@st.composite
def leaf_schedules(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(
            ["step", "multi_step", "exponential", "cosine_annealing", "linear", "constant"]
        )
    )
    gamma = draw(st.sampled_from([0.5, 0.9]))
    match kind:
        case "step":
            return {"kind": kind, "step_size": draw(st.integers(1, 3)), "gamma": gamma}
        case "multi_step":
            milestones = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3, unique=True))
            return {"kind": kind, "milestones": sorted(milestones), "gamma": gamma}
        case "exponential":
            return {"kind": kind, "gamma": gamma}
        case "cosine_annealing":
            eta_min = draw(st.sampled_from([0.0, 1e-4]))
            return {"kind": kind, "t_max": draw(st.integers(1, 5)), "eta_min": eta_min}
        case "linear":
            return {
                "kind": kind,
                "start_factor": draw(st.sampled_from([0.1, 0.5, 1.0])),
                "end_factor": draw(st.sampled_from([0.5, 1.0])),
                "total_iters": draw(st.integers(1, 4)),
            }
    return {
        "kind": kind,
        "factor": draw(st.sampled_from([0.25, 0.5, 1.0])),
        "total_iters": draw(st.integers(1, 4)),
    }


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any] | None:
    """None, one scheduler, warmup then cosine, or any sequence of schedulers."""
    shape = draw(st.sampled_from(["none", "leaf", "warmup_cosine", "sequential"]))
    if shape == "none":
        return None
    if shape == "leaf":
        return draw(leaf_schedules())
    if shape == "warmup_cosine":
        warmup = draw(st.integers(1, 3))
        return {
            "kind": "sequential",
            "schedulers": [
                {"kind": "linear", "start_factor": 0.1, "total_iters": warmup},
                {"kind": "cosine_annealing", "t_max": draw(st.integers(1, 5))},
            ],
            "milestones": [warmup],
        }
    schedulers = draw(st.lists(leaf_schedules(), min_size=2, max_size=3))
    milestones = draw(
        st.lists(
            st.integers(1, 5),
            min_size=len(schedulers) - 1,
            max_size=len(schedulers) - 1,
            unique=True,
        )
    )
    return {"kind": "sequential", "schedulers": schedulers, "milestones": sorted(milestones)}


CLIPS = st.sampled_from(
    [
        None,
        {"max_norm": 0.05, "norm_type": 2.0},
        {"max_norm": 0.5, "norm_type": 1.0},
        {"max_norm": 1.0, "norm_type": 3.0},
        {"value": 0.01},
        {"value": 0.1},
    ]
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["linear", "mlp", "exported", "embedding_mlp", "exported_ids"]))
    loss_kind = draw(st.sampled_from(LOSSES))
    in_f = draw(st.integers(1, 5))
    out_f = draw(st.integers(2 if loss_kind == "cross_entropy" else 1, 4))
    arch: dict[str, Any] = {
        "kind": "mlp" if kind == "exported" else kind,
        "in_features": in_f,
        "out_features": out_f,
        "bias": draw(st.booleans()),
        "hidden": draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
        if kind != "linear"
        else [],
        "activation": draw(st.sampled_from(sorted(ACTIVATIONS))),
    }
    if kind == "embedding_mlp":
        arch["kind"] = kind
        del arch["in_features"]
        arch["dense_features"] = draw(st.integers(0, 3))
        arch["embeddings"] = [
            {
                "input": f"ids{i}",
                "num_embeddings": draw(st.integers(1, 12)),
                "dim": draw(st.integers(1, 4)),
                "mode": draw(st.sampled_from(["sum", "mean", "max"])),
            }
            for i in range(draw(st.integers(1, 3)))
        ]
    optimizer = draw(optimizers())
    bag = draw(st.integers(1, 3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draw(st.integers(0, 2**31)))
        module = (
            FeaturesAndIds(arch, table=9, dim=3) if kind == "exported_ids" else plain_module(arch)
        )
    program = None
    if kind == "exported":  # the same mlp, as the client's torch.export archive
        program = export_module(module, (torch.zeros(2, in_f),))
        arch = {"kind": "exported", "in_features": in_f, "out_features": out_f}
    if kind == "exported_ids":  # two inputs: features (rows, in_f) and ids (rows, bag)
        example = (torch.zeros(2, in_f), torch.zeros(2, bag, dtype=torch.int64))
        program = export_module(module, example)
        arch = {"kind": "exported", "out_features": out_f, "ids": (9, bag), "features": in_f}
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
    schedule = draw(schedules())
    if schedule is not None:
        spec["schedule"] = schedule
    clip = draw(CLIPS)
    if clip is not None:
        spec["clip_grad"] = clip
    if kind == "exported_ids":
        ids = arch.pop("ids")
        features = arch.pop("features")
    return {
        "spec": spec,
        "program": program,
        "inputs": {"features": features, "ids": ids} if kind == "exported_ids" else None,
        "weighted": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31)),
        "batches": draw(st.integers(1, 9)),
        "per_message": draw(st.integers(1, 4)),
    }


def make_batches(
    spec: dict[str, Any],
    weighted: bool,
    count: int,
    seed: int,
    program_inputs: dict[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    """(x, y[, w]) batches; x is a dict of named inputs for a model with several."""
    rng = np.random.default_rng(seed)
    arch, loss = spec["architecture"], spec["loss"]["kind"]
    dtype = np.float32 if spec["dtype"] == "float32" else np.float64
    batches: list[tuple[Any, ...]] = []
    for _ in range(count):
        rows = int(rng.integers(1, 7))
        x: Any
        if program_inputs is not None:
            table, bag = program_inputs["ids"]
            x = {
                "features": rng.uniform(-1, 1, (rows, program_inputs["features"])).astype(dtype),
                "ids": rng.integers(0, table, (rows, bag)),
            }
        elif arch["kind"] == "embedding_mlp":
            bag = int(rng.integers(1, 4))
            x = {
                t["input"]: rng.integers(0, t["num_embeddings"], (rows, bag))
                for t in arch["embeddings"]
            }
            if arch["dense_features"]:
                x["dense"] = rng.uniform(-1, 1, (rows, arch["dense_features"])).astype(dtype)
        else:
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


def plain_schedule(spec: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The torch scheduler a spec names, written out."""
    sched = torch.optim.lr_scheduler
    kind = spec["kind"]
    if kind == "sequential":
        children = [plain_schedule(child, optimizer) for child in spec["schedulers"]]
        return sched.SequentialLR(optimizer, children, milestones=spec["milestones"])
    if kind == "step":
        return sched.StepLR(optimizer, step_size=spec["step_size"], gamma=spec["gamma"])
    if kind == "multi_step":
        return sched.MultiStepLR(optimizer, milestones=spec["milestones"], gamma=spec["gamma"])
    if kind == "exponential":
        return sched.ExponentialLR(optimizer, gamma=spec["gamma"])
    if kind == "cosine_annealing":
        return sched.CosineAnnealingLR(
            optimizer, T_max=spec["t_max"], eta_min=spec.get("eta_min", 0.0)
        )
    if kind == "linear":
        return sched.LinearLR(
            optimizer,
            start_factor=spec["start_factor"],
            end_factor=spec.get("end_factor", 1.0),
            total_iters=spec["total_iters"],
        )
    return sched.ConstantLR(optimizer, factor=spec["factor"], total_iters=spec["total_iters"])


def plain_loop(
    spec: dict[str, Any],
    initial: dict[str, np.ndarray],
    batches: list[tuple[Any, ...]],
    program: bytes | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """zero_grad(set_to_none=True) -> forward -> loss -> backward (x k) -> clip -> step ->
    scheduler.step(); returns the parameters and the lr the next step would use.

    ``program``: an ``exported`` model's archive, whose ``module()`` the loop trains."""
    dtype = torch.float32 if spec["dtype"] == "float32" else torch.float64
    module: nn.Module
    if program is not None:
        module = torch.export.load(io.BytesIO(program)).module().to(dtype)
    else:
        module = plain_module(spec["architecture"]).to(dtype)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.from_numpy(initial[n].copy()))
    for n, p in module.named_parameters():
        p.requires_grad_(n not in spec["frozen"])
    options = {k: v for k, v in spec["optimizer"].items() if k != "kind"}
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    optimizer = OPTIMIZERS[spec["optimizer"]["kind"]](module.parameters(), **options)
    scheduler = plain_schedule(spec["schedule"], optimizer) if "schedule" in spec else None
    clip = spec.get("clip_grad")
    k = spec["accumulate_steps"]
    for i, batch in enumerate(batches):
        if i % k == 0:
            optimizer.zero_grad(set_to_none=True)
        y = torch.from_numpy(batch[1])
        w = torch.from_numpy(batch[2]) if len(batch) == 3 else None
        if isinstance(batch[0], dict) and program is not None:  # the program's positional inputs
            out = module(*(torch.from_numpy(v) for v in batch[0].values()))
        elif isinstance(batch[0], dict):
            out = module({k: torch.from_numpy(v) for k, v in batch[0].items()})
        else:
            out = module(torch.from_numpy(batch[0]))
        plain_loss(spec["loss"], out, y, w).backward()
        if i % k == k - 1:
            if clip is not None and "max_norm" in clip:
                nn.utils.clip_grad_norm_(module.parameters(), clip["max_norm"], clip["norm_type"])
            elif clip is not None:
                nn.utils.clip_grad_value_(module.parameters(), clip["value"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    params = {n: p.detach().numpy().copy() for n, p in module.named_parameters()}
    return params, optimizer.param_groups[0]["lr"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=scenarios())
def test_service_equals_plain_pytorch_loop_bitwise(client: Client, case: dict[str, Any]) -> None:
    spec = case["spec"]
    name = f"exact-{abs(hash(repr(case))) % 10**12}"
    client.create_model(name, spec, program=case["program"])
    try:
        initial = client.parameters(name)
        batches = make_batches(
            spec, case["weighted"], case["batches"], case["seed"], case["inputs"]
        )
        if isinstance(batches[0][0], dict):
            outcomes = train_named(client, name, batches, case["per_message"])
        else:
            results = list(client.train(name, batches, batches_per_message=case["per_message"]))
            outcomes = [r.outcome for r in results]
        k = spec["accumulate_steps"]
        assert outcomes == [
            "APPLIED" if i % k == k - 1 else "ACCUMULATED" for i in range(len(batches))
        ]
        got = client.parameters(name)
        expected, lr = plain_loop(spec, initial, batches, case["program"])
        assert client.get_model(name).lr == lr
        assert got.keys() == expected.keys()
        for n in expected:
            assert got[n].dtype == expected[n].dtype
            assert got[n].tobytes() == expected[n].tobytes(), n
        for n in spec["frozen"]:
            assert got[n].tobytes() == initial[n].tobytes()
    finally:
        client.delete_model(name)


def train_named(
    client: Client, name: str, batches: list[tuple[Any, ...]], per_message: int
) -> list[str]:
    """Batches of named inputs on a raw Train stream (Batch.inputs), ``per_message`` a message."""
    requests = [pb.TrainRequest(open=pb.TrainOpen(model=name))]
    for start in range(0, len(batches), per_message):
        message = pb.TrainRequest()
        for inputs, y, *weight in batches[start : start + per_message]:
            batch = message.batches.add(y=to_proto(y))
            if weight:
                batch.sample_weight.CopyFrom(to_proto(weight[0]))
            for key, value in inputs.items():
                batch.inputs.add(name=key, tensor=to_proto(value))
        requests.append(message)
    responses = list(client._stub.Train(iter(requests)))
    results = [r for response in responses[1:] for r in response.results]
    return [pb.Outcome.Name(r.outcome).removeprefix("OUTCOME_") for r in results]

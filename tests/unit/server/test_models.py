"""``embedding_mlp``: the module the issue specifies, bit for bit, and its spec's validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gradstream.server.errors import InvalidArgument
from gradstream.server.models import build_module, example_inputs, model_inputs
from gradstream.server.registry import parameter_count
from gradstream.server.spec import ModelSpec, parse_spec

TABLES: list[dict[str, Any]] = [
    {"input": "user", "num_embeddings": 50, "dim": 4, "mode": "sum"},
    {"input": "item", "num_embeddings": 30, "dim": 3, "mode": "mean"},
    {"input": "tags", "num_embeddings": 20, "dim": 2, "mode": "max"},
]


def _spec(dense: int = 5, **architecture: Any) -> ModelSpec:
    arch = {
        "kind": "embedding_mlp",
        "embeddings": TABLES,
        "dense_features": dense,
        "hidden": [8, 6],
        "out_features": 2,
        "activation": "tanh",
        "bias": True,
    }
    return parse_spec(
        {
            "architecture": arch | architecture,
            "init": {"seed": 7},
            "optimizer": {"kind": "adam", "lr": 0.01},
        }
    )


class HandBuilt(nn.Module):
    """The issue's definition written out: tables in order, cat with dense, then the layers."""

    def __init__(self, dense: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(t["num_embeddings"], t["dim"], mode=t["mode"]) for t in TABLES
        )
        self.layers = nn.Sequential(
            nn.Linear(4 + 3 + 2 + dense, 8),
            nn.Tanh(),
            nn.Linear(8, 6),
            nn.Tanh(),
            nn.Linear(6, 2),
        )
        self.dense = dense

    def forward(self, ids: list[torch.Tensor], dense: torch.Tensor | None) -> torch.Tensor:
        features = [table(i) for table, i in zip(self.tables, ids, strict=True)]
        if dense is not None:
            features.append(dense)
        out: torch.Tensor = self.layers(torch.cat(features, dim=1))
        return out


def _inputs(rows: int, dense: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        t["input"]: torch.randint(0, t["num_embeddings"], (rows, 3), generator=g) for t in TABLES
    }
    if dense:
        inputs["dense"] = torch.randn(rows, dense, generator=g)
    return inputs


@pytest.mark.parametrize("dense", [5, 0])
def test_embedding_mlp_is_bitwise_the_hand_built_module(dense: int) -> None:
    spec = _spec(dense)
    ours = build_module(spec, torch.device("cpu"))
    torch.manual_seed(7)  # the spec's seed; construction order is the listed one
    theirs = HandBuilt(dense)
    names = [n for n, _ in ours.named_parameters()]
    assert names == [
        "embeddings.user.weight",
        "embeddings.item.weight",
        "embeddings.tags.weight",
        *(f"mlp.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")),
    ]
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    opt_a = torch.optim.Adam(ours.parameters(), lr=0.01)
    opt_b = torch.optim.Adam(theirs.parameters(), lr=0.01)
    for step in range(4):
        inputs = _inputs(16, dense, step)
        y = torch.randn(16, 2, generator=torch.Generator().manual_seed(100 + step))
        ids = [inputs[t["input"]] for t in TABLES]
        ordered = [inputs[i.name] for i in model_inputs(spec)]  # declaration order
        opt_a.zero_grad()
        nn.functional.mse_loss(ours(*ordered), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        nn.functional.mse_loss(theirs(ids, inputs.get("dense")), y).backward()
        opt_b.step()
        assert torch.equal(ours(*ordered), theirs(ids, inputs.get("dense")))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dense", [5, 0])
def test_it_declares_one_integer_input_per_table_then_dense(dense: int) -> None:
    declared = model_inputs(_spec(dense))
    tables = [(t["input"], "integer", (-1,), t["num_embeddings"]) for t in TABLES]
    assert [(i.name, i.kind, i.shape, i.ids_below) for i in declared] == tables + (
        [("dense", "float", (dense,), 0)] if dense else []
    )
    module = build_module(_spec(dense), torch.device("cpu"))
    assert module(*example_inputs(declared, 3, torch.float32)).shape == (3, 2)


def test_linear_and_mlp_declare_one_float_x() -> None:
    spec = parse_spec({"architecture": {"kind": "mlp", "in_features": 3, "out_features": 1}})
    assert [(i.name, i.kind, i.shape) for i in model_inputs(spec)] == [("x", "float", (3,))]


def test_tables_count_toward_the_parameter_limit_without_being_allocated() -> None:
    spec = _spec()
    expected = 50 * 4 + 30 * 3 + 20 * 2 + (14 * 8 + 8) + (8 * 6 + 6) + (6 * 2 + 2)
    assert parameter_count(spec) == expected
    huge = [{"input": "user", "num_embeddings": 2**40, "dim": 2**10}]
    assert parameter_count(_spec(embeddings=huge)) == 2**50 + (2**10 + 5) * 8 + 8 + 54 + 14


def test_in_features_is_derived() -> None:
    assert _spec().architecture.in_features == 4 + 3 + 2 + 5
    assert _spec(0).architecture.in_features == 9
    assert _spec(in_features=14).architecture.in_features == 14


@pytest.mark.parametrize(
    ("architecture", "field", "value"),
    [
        ({"embeddings": []}, "spec.architecture.embeddings", "at least one"),
        ({"embeddings": [TABLES[0], TABLES[0]]}, "spec.architecture.embeddings", "['user']"),
        (
            {"embeddings": [{"input": "dense", "num_embeddings": 2, "dim": 2}]},
            "spec.architecture.embeddings.0.input",
            "'dense'",
        ),
        (
            {"embeddings": [{"input": "forward", "num_embeddings": 2, "dim": 2}]},
            "spec.architecture.embeddings.0.input",
            "'forward'",
        ),
        (
            {"embeddings": [{"input": "a.b", "num_embeddings": 2, "dim": 2}]},
            "spec.architecture.embeddings.0.input",
            "'a.b'",
        ),
        (
            {"embeddings": [{"input": "u", "num_embeddings": 0, "dim": 2}]},
            "spec.architecture.embeddings.0.num_embeddings",
            "0",
        ),
        (
            {"embeddings": [{"input": "u", "num_embeddings": 2, "dim": 2, "mode": "min"}]},
            "spec.architecture.embeddings.0.mode",
            "'min'",
        ),
        ({"dense_features": -1}, "spec.architecture.dense_features", "-1"),
        ({"in_features": 3}, "spec.architecture.in_features", "got 3"),
    ],
)
def test_bad_embedding_specs_name_the_field(
    architecture: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _spec(**architecture)
    assert caught.value.field == field
    assert value in caught.value.message


def test_other_kinds_take_no_tables() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec(
            {
                "architecture": {
                    "kind": "mlp",
                    "in_features": 2,
                    "out_features": 1,
                    "embeddings": TABLES,
                }
            }
        )
    assert caught.value.field == "spec.architecture.embeddings"

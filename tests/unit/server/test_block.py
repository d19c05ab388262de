"""A message checked as one block: the same batches, rejections and steps as one by one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.engine import Trainer, TrainOptions
from gradstream.server.session import (
    BLOCK_MIN_BATCHES,
    Rejected,
    decode,
    decode_message,
    train_message,
)
from gradstream.server.spec import ModelSpec, parse_spec
from gradstream.server.wire import WireBatch, WireTensor
from gradstream.wire import wire_array
from tests.conftest import examples

CPU = torch.device("cpu")
SPECS: dict[str, ModelSpec] = {
    "linear": parse_spec({"architecture": {"kind": "linear", "in_features": 3, "out_features": 2}}),
    "one": parse_spec({"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}}),
    "classes": parse_spec(
        {
            "architecture": {"kind": "linear", "in_features": 3, "out_features": 4},
            "loss": {"kind": "cross_entropy"},
        }
    ),
    "double": parse_spec(
        {
            "architecture": {"kind": "linear", "in_features": 3, "out_features": 2},
            "dtype": "float64",
        }
    ),
    "ctr": parse_spec(
        {
            "architecture": {
                "kind": "embedding_mlp",
                "embeddings": [{"input": "user", "num_embeddings": 10, "dim": 2}],
                "dense_features": 3,
                "out_features": 2,
            }
        }
    ),
}
FAULTS = [
    "nan_x",
    "inf_y",
    "overflow_x",  # finite as float64, infinite in a float32 model
    "label",
    "id",
    "negative_weight",
    "zero_weight",
    "rows",
    "dtype",
    "no_y",
    "weight",  # a weight where the others have none, or none where they have one
    "shared",
    "names",
    "data",
]


def _tensor(array: Any) -> WireTensor:
    wire, code = wire_array(array)
    return WireTensor(code, tuple(wire.shape), wire.tobytes())


def _batch(
    model: str, rows: int, wide: bool, weighted: bool, seed: int, fault: str | None, seq: int
) -> WireBatch:
    """One batch of the message: good, or with ``fault``."""
    rng = np.random.default_rng(seed)
    dtype = np.float64 if wide else np.float32
    rows = rows + 1 if fault == "rows" else rows
    classes = model == "classes"
    width = 1 if model == "one" else 3
    x = rng.normal(size=(rows, width) if width > 1 else (rows,)).astype(dtype)
    y: Any = (
        rng.integers(0, 4, rows)
        if classes
        else rng.normal(size=(rows, 2) if model != "one" else (rows,)).astype(dtype)
    )
    w = rng.uniform(0.5, 2.0, rows).astype(dtype)
    if fault == "nan_x":
        x.flat[rng.integers(x.size)] = np.nan
    if fault == "inf_y" and not classes:
        y.flat[rng.integers(y.size)] = np.inf
    if fault == "overflow_x":
        x = x.astype(np.float64)
        x.flat[0] = 1e300
    if fault == "label" and classes:
        y[rng.integers(rows)] = 4
    if fault == "negative_weight":
        w[rng.integers(rows)] = -1.0
    if fault == "zero_weight":
        w[:] = 0.0
    if fault == "dtype":
        x = x.astype(np.float32 if wide else np.float64)
    weighted = weighted != (fault == "weight")
    batch = WireBatch(
        y=None if fault == "no_y" else _tensor(y),
        sample_weight=_tensor(w) if weighted else None,
        sequence=seq,
    )
    if model == "ctr":
        ids = rng.integers(0, 10, (rows, 2))
        if fault == "id":
            ids[0, 0] = 10
        inputs: list[tuple[str, WireTensor | None]] = [
            ("dense", _tensor(x)),
            ("user", _tensor(ids.astype(np.int32))),
        ]
        if fault == "names":
            inputs.reverse()
        batch.inputs = inputs
    elif fault == "names":
        batch.inputs = [("x", _tensor(x))]
    else:
        batch.x = _tensor(x)
    if fault == "shared":
        batch.y = WireTensor(batch.y.dtype, batch.y.shape, b"", (0, 8)) if batch.y else None
    if fault == "data":  # same dtype and shape, bytes of another length
        tensor = batch.x if batch.x is not None else batch.inputs[0][1]
        assert tensor is not None
        tensor.data = bytes(tensor.data)[:-1]
    return batch


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, list[WireBatch]]:
    model = draw(st.sampled_from(sorted(SPECS)))
    rows = draw(st.integers(1, 5))
    wide = draw(st.booleans())
    weighted = draw(st.booleans())
    n = draw(st.integers(1, 10))
    faults = draw(
        st.lists(st.one_of(st.none(), st.none(), st.sampled_from(FAULTS)), min_size=n, max_size=n)
    )
    seeds = draw(st.lists(st.integers(0, 2**16), min_size=n, max_size=n))
    return model, [
        _batch(model, rows, wide, weighted, seed, fault, 10 + i)
        for i, (seed, fault) in enumerate(zip(seeds, faults, strict=True))
    ]


def _same(a: Batch | Rejected, b: Batch | Rejected) -> None:
    if isinstance(a, Rejected) or isinstance(b, Rejected):
        assert a == b
        return
    assert a.sequence == b.sequence
    pairs = [(a.x, b.x), (a.y, b.y), *zip(a.more, b.more, strict=True)]
    assert (a.weight is None) == (b.weight is None)
    if a.weight is not None and b.weight is not None:
        pairs.append((a.weight, b.weight))
    for s, t in pairs:
        assert s.dtype == t.dtype and s.shape == t.shape
        assert torch.equal(s, t)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_the_block_decodes_every_message_as_batch_by_batch(
    message: tuple[str, list[WireBatch]],
) -> None:
    model, batches = message
    checker = BatchChecker(SPECS[model], max_rows=5)
    one_by_one = [decode(checker, b, i, None) for i, b in enumerate(batches)]
    block = decode_message(checker, batches)
    assert len(block) == len(one_by_one)
    for a, b in zip(block, one_by_one, strict=True):
        _same(a, b)
    # And the steps: parameters bitwise equal after training each list.
    trainers = [Trainer("t", SPECS[model], CPU) for _ in range(2)]
    for trainer, items in zip(trainers, [block, one_by_one], strict=True):
        train_message(trainer, items, TrainOptions())
    for p, q in zip(trainers[0].module.parameters(), trainers[1].module.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("model", sorted(SPECS))
def test_a_message_of_one_layout_is_one_block(model: str) -> None:
    """The block path is taken: every batch's tensors are views of one buffer."""
    checker = BatchChecker(SPECS[model])
    batches = [_batch(model, 3, False, True, seed, None, seed + 1) for seed in range(6)]
    items = decode_message(checker, batches)
    checked = [i for i in items if isinstance(i, Batch)]
    assert len(checked) == len(batches)
    parts = [[*i.inputs, i.y, i.weight] for i in checked]
    for column in zip(*parts, strict=True):
        assert len({t.untyped_storage().data_ptr() for t in column if t is not None}) == 1
    for a, b in zip(
        items, [decode(checker, b, i, None) for i, b in enumerate(batches)], strict=True
    ):
        _same(a, b)


@pytest.mark.parametrize(
    ("n", "block", "one"),
    [(BLOCK_MIN_BATCHES, True, True), (BLOCK_MIN_BATCHES - 1, True, False), (6, False, False)],
)
def test_a_block_is_taken_from_its_least_number_of_batches_and_only_when_asked(
    n: int, block: bool, one: bool
) -> None:
    """Below BLOCK_MIN_BATCHES the block costs more than it saves; large batches (the
    stream asks with ``block`` False) are checked one by one on the model's worker."""
    checker = BatchChecker(SPECS["linear"])
    batches = [_batch("linear", 3, False, True, seed, None, seed + 1) for seed in range(n)]
    items = decode_message(checker, batches, block=block)
    buffers = {i.x.untyped_storage().data_ptr() for i in items if isinstance(i, Batch)}
    assert len(items) == n and len(buffers) == (1 if one else n)


def test_one_bad_batch_is_rejected_by_its_own_name_and_the_others_train() -> None:
    checker = BatchChecker(SPECS["linear"])
    batches = [
        _batch("linear", 2, False, False, s, "nan_x" if s == 3 else None, s) for s in range(6)
    ]
    items = decode_message(checker, batches)
    assert [isinstance(i, Rejected) for i in items] == [False] * 3 + [True] + [False] * 2
    rejected = items[3]
    assert isinstance(rejected, Rejected)
    assert rejected.reason.startswith("batches[3].x: contains a non-finite value (nan)")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("model", sorted(SPECS))
@pytest.mark.parametrize("weighted", [False, True])
def test_each_fault_in_one_batch_of_a_block_is_rejected_as_alone(
    model: str, fault: str, weighted: bool
) -> None:
    checker = BatchChecker(SPECS[model], max_rows=5)
    batches = [_batch(model, 3, False, weighted, s, fault if s == 2 else None, s) for s in range(5)]
    one_by_one = [decode(checker, b, i, None) for i, b in enumerate(batches)]
    for a, b in zip(decode_message(checker, batches), one_by_one, strict=True):
        _same(a, b)

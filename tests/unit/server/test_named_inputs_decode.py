"""Named inputs in process: ``session.decode`` over the service test's table of bad batches.

The mutation run (docs/testing.md) runs only in-process tests, so the rules that
tests/integration/test_named_inputs.py checks through gRPC are checked here too, with the
whole reason where the service test reads words of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch

from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.engine import Outcome, Trainer, TrainOptions
from gradstream.server.errors import InvalidArgument, ResourceExhausted
from gradstream.server.session import Rejected, decode
from gradstream.server.shm import open_shared_memory
from gradstream.server.spec import parse_spec
from gradstream.server.wire import WireBatch, WireTensor, from_message
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto, wire_array
from tests.integration.test_named_inputs import (
    BAD,
    DENSE,
    SPEC,
    inputs,
    target,
    textbook,
    textbook_names,
)

CHECKER = BatchChecker(parse_spec(SPEC))
LISTED = "user (integer (rows, any)), item (integer (rows, any)), dense (float (rows, 5))"


def _wire(pairs: list[tuple[str, np.ndarray]], x: np.ndarray | None = None) -> WireBatch:
    batch = pb.Batch(
        x=None if x is None else to_proto(x),
        inputs=[pb.NamedTensor(name=k, tensor=to_proto(v)) for k, v in pairs],
        y=to_proto(target(4, 0)),
        sequence=7,
    )
    [wire] = from_message(pb.TrainRequest(batches=[batch])).batches
    return wire


@pytest.mark.parametrize(("case", "pairs", "x", "field", "reason"), BAD, ids=[c[0] for c in BAD])
def test_a_bad_batch_is_rejected_naming_the_input(
    case: str, pairs: list[tuple[str, np.ndarray]], x: np.ndarray | None, field: str, reason: str
) -> None:
    got = decode(CHECKER, _wire(pairs, x), 2, None)
    assert isinstance(got, Rejected), case
    assert got.reason.startswith(f"batches[2].{field}: "), got.reason
    assert reason in got.reason
    assert got.sequence == 7


# The whole reasons, where the table above reads a few words.
WHOLE = [
    (
        "missing",
        [("user", inputs(4, 0)["user"]), ("dense", inputs(4, 0)["dense"])],
        None,
        f"batches[2].inputs: misses item (integer (rows, any)); the model takes {LISTED}",
    ),
    (
        "two missing",
        [("user", inputs(4, 0)["user"])],
        None,
        "batches[2].inputs: misses item (integer (rows, any)), dense (float (rows, 5)); "
        f"the model takes {LISTED}",
    ),
    (
        "smallest id and one too large",
        list((inputs(4, 0) | {"item": np.array([[0, 31]] * 4)}).items()),
        None,
        "batches[2].inputs[item]: id 31 is out of range [0, 30)",
    ),
    (
        "unknown",
        [("age", np.ones((4, 1), np.float32))],
        None,
        f"batches[2].inputs[0].name: 'age' is not an input of this model; it takes {LISTED}",
    ),
    (
        "x alone",
        [],
        np.ones((4, 12), np.float32),
        f"batches[2].x: the model takes 3 inputs ({LISTED}); send them by name in inputs",
    ),
    (
        "rows differ",
        list((inputs(4, 0) | {"item": inputs(2, 0)["item"]}).items()),
        None,
        "batches[2].inputs[item]: has 2 rows, batches[2].inputs[user] has 4; "
        "inputs have equal rows",
    ),
    (
        "no rows",
        list((inputs(4, 0) | {"user": np.zeros((0, 3), np.int64)}).items()),
        None,
        "batches[2].inputs[user]: is an empty batch (0 rows)",
    ),
    (
        "empty rows",
        list((inputs(4, 0) | {"user": np.zeros((4, 0), np.int64)}).items()),
        None,
        "batches[2].inputs[user]: has shape [4, 0], an empty row",
    ),
    (
        "id too large",
        list((inputs(4, 0) | {"item": np.full((4, 2), 30)}).items()),
        None,
        "batches[2].inputs[item]: id 30 is out of range [0, 30)",
    ),
    (
        "nothing",
        [],
        None,
        f"batches[2].inputs: the model takes 3 inputs ({LISTED}); send them by name in inputs",
    ),
]


@pytest.mark.parametrize(("case", "pairs", "x", "reason"), WHOLE, ids=[c[0] for c in WHOLE])
def test_the_reasons_name_every_declared_input(
    case: str, pairs: list[tuple[str, np.ndarray]], x: np.ndarray | None, reason: str
) -> None:
    got = decode(CHECKER, _wire(pairs, x), 2, None)
    assert isinstance(got, Rejected), case
    assert got.reason.startswith(reason), got.reason


def test_inputs_in_any_order_arrive_in_declaration_order() -> None:
    arrays = inputs(4, 1)
    got = decode(CHECKER, _wire(list(reversed(arrays.items()))), 0, None)
    assert isinstance(got, Batch)
    assert got.sequence == 7 and len(got.more) == 2
    for tensor, key in zip(got.inputs, ["user", "item", "dense"], strict=True):
        assert torch.equal(tensor, torch.from_numpy(arrays[key])), key
    assert torch.equal(got.y, torch.from_numpy(target(4, 0)))


def test_a_single_input_model_takes_its_input_by_name() -> None:
    spec = parse_spec({"architecture": {"kind": "linear", "in_features": DENSE, "out_features": 1}})
    checker = BatchChecker(spec)
    x = np.ones((4, DENSE), np.float32)
    got = decode(checker, _wire([("x", x)]), 0, None)
    assert isinstance(got, Batch) and got.more == ()
    assert torch.equal(got.x, torch.from_numpy(x))
    both = decode(checker, _wire([("x", x)], x), 0, None)
    assert isinstance(both, Rejected)
    assert both.reason == "batches[0].inputs: set x or inputs, not both"
    missing = decode(checker, _wire([]), 0, None)
    assert isinstance(missing, Rejected)
    assert missing.reason == "batches[0].x: is missing"


def test_arrange_and_features_called_directly() -> None:
    """Predict and ComputeGradients call these without a field prefix, and segments unquoted."""
    arrays = inputs(4, 0)
    with pytest.raises(InvalidArgument) as caught:
        CHECKER.arrange(arrays["dense"], list(arrays.items()))
    assert str(caught.value) == "inputs: set x or inputs, not both"
    with pytest.raises(InvalidArgument) as caught:
        CHECKER.arrange(None, [])
    assert str(caught.value).startswith("inputs: the model takes 3 inputs")
    single = BatchChecker(
        parse_spec({"architecture": {"kind": "linear", "in_features": 2, "out_features": 1}})
    )
    x = np.array([[1.0, 2.0]], np.float32)
    assert single.arrange(x, []) == [("x", x)]
    (got,) = single.features([x], ["req.x"])
    assert torch.equal(got, torch.from_numpy(x))
    bad = np.array([[1.0, np.nan]], np.float32)
    with pytest.raises(InvalidArgument) as caught:
        single.features([bad], ["req.x"])
    assert str(caught.value).startswith("req.x: contains a non-finite value (nan)")
    with pytest.raises(InvalidArgument) as caught:
        single.features([bad], ["req.x"], quote=False)
    assert str(caught.value) == "req.x: contains a non-finite value"
    ids = arrays | {"user": np.full((4, 3), 50)}
    fields = [f"inputs[{k}]" for k in ("user", "item", "dense")]
    ordered = [ids[k] for k in ("user", "item", "dense")]
    with pytest.raises(InvalidArgument) as caught:
        CHECKER.features(ordered, fields, quote=False)
    assert str(caught.value) == "inputs[user]: an id is out of range [0, 50)"
    ordered = [arrays[k] for k in ("user", "item", "dense")]
    assert len(BatchChecker(parse_spec(SPEC), max_rows=4).features(ordered, fields)) == 3
    with pytest.raises(ResourceExhausted):
        BatchChecker(parse_spec(SPEC), max_rows=3).features(ordered, fields)


def test_a_trainer_steps_on_every_input_bitwise_like_the_textbook_loop() -> None:
    """The step pipeline in process: ``module(user, item, dense)``, not only its first input."""
    trainer = Trainer("m", parse_spec(SPEC), torch.device("cpu"))
    sent = [(inputs(6 + i, i, bag=1 + i % 3), target(6 + i, i)) for i in range(3)]
    for i, (arrays, y) in enumerate(sent):
        wire = pb.Batch(
            inputs=[pb.NamedTensor(name=k, tensor=to_proto(v)) for k, v in arrays.items()],
            y=to_proto(y),
            sequence=i + 1,
        )
        [batch] = from_message(pb.TrainRequest(batches=[wire])).batches
        decoded = decode(trainer.checker, batch, i, None)
        assert isinstance(decoded, Batch)
        result = trainer.train(decoded, TrainOptions(producer_id="p"))
        assert result.outcome == Outcome.APPLIED
    want = textbook_names(textbook(sent))
    got = dict(trainer.module.named_parameters())
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key].detach(), value), key


def test_batch_and_features_name_the_input_in_every_check() -> None:
    arrays = inputs(4, 0)
    user, item, dense = (arrays[k] for k in ("user", "item", "dense"))
    y = target(4, 0)
    fields = ["b.inputs[user]", "b.inputs[item]", "b.inputs[dense]"]
    bad_dense = dense.copy()
    bad_dense[1, 2] = np.nan
    with pytest.raises(InvalidArgument) as caught:
        CHECKER.features([user, item, bad_dense], fields)
    assert str(caught.value).startswith("b.inputs[dense]: contains a non-finite value (nan)")
    with pytest.raises(ResourceExhausted) as limited:
        BatchChecker(parse_spec(SPEC), max_bytes=8).features([user, item, dense], fields)
    assert str(limited.value).startswith("b.inputs[user]: max_batch_bytes: has ")
    with pytest.raises(ResourceExhausted) as limited:
        BatchChecker(parse_spec(SPEC), max_activation_bytes=8).features([user, item, dense], fields)
    assert str(limited.value).startswith("b.inputs[user]: max_activation_bytes: ")
    # batch without fields names each input under its field; unquoted values stay out.
    too_large = np.full((4, 3), 50)
    with pytest.raises(InvalidArgument) as caught:
        CHECKER.batch(too_large, y, more=[item, dense], field="b")
    assert str(caught.value) == "b.inputs[user]: id 50 is out of range [0, 50)"
    with pytest.raises(InvalidArgument) as caught:
        CHECKER.batch(too_large, y, more=[item, dense], field="b", quote=False)
    assert str(caught.value) == "b.inputs[user]: an id is out of range [0, 50)"
    # The byte limit counts every input, y and the weight, at its boundary.
    weight = np.ones(4, np.float32)
    size = user.nbytes + item.nbytes + dense.nbytes + y.nbytes + weight.nbytes
    BatchChecker(parse_spec(SPEC), max_bytes=size).batch(user, y, weight, more=[item, dense])
    with pytest.raises(ResourceExhausted) as limited:
        BatchChecker(parse_spec(SPEC), max_bytes=size - 1).batch(
            user, y, weight, more=[item, dense], field="b"
        )
    assert str(limited.value).startswith(f"b: max_batch_bytes: has {size} bytes")


def test_a_single_input_sent_by_name_is_named_so_in_reasons() -> None:
    spec = parse_spec({"architecture": {"kind": "linear", "in_features": 2, "out_features": 1}})
    x = np.array([[1.0, np.inf]] * 4, np.float32)
    got = decode(BatchChecker(spec), _wire([("x", x)]), 0, None)
    assert isinstance(got, Rejected)
    assert got.reason.startswith("batches[0].inputs[x]: contains a non-finite value (inf)")


def test_a_malformed_named_input_is_rejected_naming_the_input() -> None:
    pairs = list(inputs(4, 0).items())
    batch = pb.Batch(
        inputs=[pb.NamedTensor(name=k, tensor=to_proto(v)) for k, v in pairs],
        y=to_proto(target(4, 0)),
        sequence=7,
    )
    batch.inputs[1].tensor.dtype = cast(pb.DataType, 99)  # a dtype code no client sends
    [wire] = from_message(pb.TrainRequest(batches=[batch])).batches
    got = decode(CHECKER, wire, 2, None)
    assert isinstance(got, Rejected)
    assert got.reason.startswith(f"batches[2].inputs[{pairs[1][0]}].dtype: "), got.reason


def test_named_inputs_in_the_shared_segment_are_read_from_it_and_never_quoted(
    tmp_path: Path,
) -> None:
    """The named-inputs path of ``checked`` with every tensor in the stream's segment."""
    arrays = inputs(4, 0)
    y, weight = target(4, 0), np.array([0.5, 1.0, 2.0, 1.0], np.float32)
    too_large = arrays["item"].copy()
    too_large[1, 0] = 31
    nan_y, negative = y.copy(), weight.copy()
    nan_y.flat[2], negative[3] = np.nan, -1.0
    parts = [*arrays.values(), y, weight, too_large, nan_y, negative]
    (tmp_path / "gradstream-n").write_bytes(b"".join(p.tobytes() for p in parts))
    segment = open_shared_memory("gradstream-n", "ipv4:127.0.0.1:5555", str(tmp_path))
    offsets = np.cumsum([0] + [p.nbytes for p in parts]).tolist()

    def shared(i: int) -> WireTensor:
        wire, code = wire_array(parts[i])
        return WireTensor(code, tuple(wire.shape), b"", (offsets[i], parts[i].nbytes))

    def batch(item: int = 1, y_at: int = 3, weight_at: int = 4) -> WireBatch:
        named: list[tuple[str, WireTensor | None]] = [
            ("user", shared(0)),
            ("item", shared(item)),
            ("dense", shared(2)),
        ]
        return WireBatch(None, shared(y_at), shared(weight_at), 9, named)

    def malformed(part: str) -> WireBatch:  # a dtype code no client sends
        wire = batch()
        tensor = getattr(wire, part)
        setattr(wire, part, WireTensor(99, tensor.shape, b"", tensor.shared))
        return wire

    got = decode(CHECKER, batch(), 1, segment)
    assert isinstance(got, Batch) and got.sequence == 9
    for tensor, array in zip(got.inputs, arrays.values(), strict=True):
        assert torch.equal(tensor, torch.from_numpy(array))
    assert torch.equal(got.y, torch.from_numpy(y).reshape(got.y.shape))
    assert got.weight is not None and torch.equal(got.weight, torch.from_numpy(weight))
    for bad, reason in [
        (batch(item=5), "batches[1].inputs[item]: an id is out of range [0, 30)"),
        (batch(y_at=6), "batches[1].y: contains a non-finite value"),
        (batch(weight_at=7), "batches[1].sample_weight: "),
        (malformed("y"), "batches[1].y.dtype: "),
        (malformed("sample_weight"), "batches[1].sample_weight.dtype: "),
    ]:
        rejected = decode(CHECKER, bad, 1, segment)
        assert isinstance(rejected, Rejected) and rejected.sequence == 9
        assert rejected.reason.startswith(reason), rejected.reason
        assert "nan" not in rejected.reason and "-1" not in rejected.reason

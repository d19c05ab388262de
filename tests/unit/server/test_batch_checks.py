"""Every check of ``BatchChecker.batch``, with the exact reason a client is answered.

tests/integration/test_bad_input.py sends bad batches through the service; these check
each rule and its message in process (the `make mutate` subset, docs/testing.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.errors import InvalidArgument, ResourceExhausted
from gradstream.server.spec import parse_spec

CLASSES_SPEC = parse_spec(
    {
        "architecture": {"kind": "mlp", "in_features": 2, "hidden": [3], "out_features": 3},
        "loss": {"kind": "cross_entropy"},
    }
)
CLASSES = BatchChecker(CLASSES_SPEC)
VALUES = BatchChecker(
    parse_spec({"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}})
)
X = np.ones((4, 2), np.float32)
Y = np.array([0, 1, 2, 1], np.int64)
W = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
NAN = np.float32(np.nan)

# (case, x, y, weight, reason when quoted, reason for a segment's bytes)
BAD: list[tuple[str, Any, Any, Any, str, str]] = [
    ("x shape", np.ones((4, 3), np.float32), Y, None,
     "x: has shape [4, 3], the model expects (rows, 2)", ""),
    ("x 1-d", np.ones(4, np.float32), Y, None,
     "x: has shape [4], the model expects (rows, 2)", ""),
    ("x dtype", np.ones((4, 2), np.int64), Y, None,
     "x: has dtype int64, expected floating point", ""),
    ("x empty", np.ones((0, 2), np.float32), np.ones(0, np.int64), None,
     "x: is an empty batch (0 rows)", ""),
    ("x nan", np.where(np.eye(4, 2) > 0, NAN, X), Y, None,
     "x: contains a non-finite value (nan)", "x: contains a non-finite value"),
    ("x inf as float32", np.full((4, 2), 1e300), Y, None,
     "x: contains a non-finite value (inf) as float32",
     "x: contains a non-finite value as float32"),
    ("y dtype", X, Y.astype(np.float32), None,
     "y: has dtype float32, cross_entropy takes int64 class labels", ""),
    ("y rows", X, Y[:3], None, "y: has shape [3], expected (4,) labels", ""),
    ("y 2-d", X, Y.reshape(4, 1), None, "y: has shape [4, 1], expected (4,) labels", ""),
    ("label high", X, np.array([0, 3, 2, 1]), None,
     "y: label 3 is out of range [0, 3)", "y: a label is out of range [0, 3)"),
    ("label negative", X, np.array([0, 1, -1, 5]), None,
     "y: label -1 is out of range [0, 3)", "y: a label is out of range [0, 3)"),
    ("weight dtype", X, Y, np.ones(4, np.int64),
     "sample_weight: has dtype int64, expected floating point", ""),
    ("weight rows", X, Y, np.ones(3, np.float32),
     "sample_weight: has shape [3], expected (4,)", ""),
    ("weight negative", X, Y, np.array([1.0, -0.5, -2.0, 1.0], np.float32),
     "sample_weight: has a negative weight -2.0", "sample_weight: has a negative weight"),
    ("weights zero", X, Y, np.zeros(4, np.float32), "sample_weight: weights are all zero", ""),
    ("weight nan", X, Y, np.array([1.0, NAN, 1.0, 1.0], np.float32),
     "sample_weight: contains a non-finite value (nan)",
     "sample_weight: contains a non-finite value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "x", "y", "w", "quoted", "unquoted"), BAD, ids=[b[0] for b in BAD]
)
def test_a_bad_batch_is_refused_naming_the_field(
    case: str, x: Any, y: Any, w: Any, quoted: str, unquoted: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        CLASSES.batch(x, y, w, 3, "b")
    assert str(caught.value) == f"b.{quoted}"
    with pytest.raises(InvalidArgument) as caught:
        CLASSES.batch(x, y, w, 3, "b", quote=False)
    assert str(caught.value) == f"b.{unquoted or quoted}"


def test_a_good_batch_is_in_the_models_dtype_with_its_sequence() -> None:
    y32 = Y.astype(np.int32)
    batch = CLASSES.batch(X.astype(np.float64), y32, W.astype(np.float64), 9, "b")
    assert batch == Batch(batch.x, batch.y, batch.weight, 9)
    assert batch.x.dtype == torch.float32 and torch.equal(batch.x, torch.ones(4, 2))
    assert batch.y.dtype == torch.int64 and batch.y.tolist() == [0, 1, 2, 1]
    assert batch.weight is not None and batch.weight.dtype == torch.float32
    assert batch.weight.tolist() == [1.0, 0.5, 0.0, 2.0]
    assert CLASSES.batch(X, Y).weight is None and CLASSES.batch(X, Y).sequence == 0
    small = np.array([0.0, 0.25, 0.0, 1.0], np.float32)  # none above 1, not all zero
    assert CLASSES.weights(small, 4).tolist() == small.tolist()


def test_values_take_one_column_as_a_vector_and_check_the_outputs_shape() -> None:
    batch = VALUES.batch(np.ones(3, np.float32), np.arange(3, dtype=np.float32))
    assert batch.x.shape == (3, 1) and batch.y.shape == (3, 1)
    assert batch.y.flatten().tolist() == [0.0, 1.0, 2.0]
    cases: list[tuple[Any, str]] = [
        (np.ones((3, 2), np.float32), "y: has shape [3, 2], expected (3, 1)"),
        (np.ones(2, np.float32), "y: has shape [2, 1], expected (3, 1)"),
        (np.ones(3, np.int64), "y: has dtype int64, expected floating point"),
        (np.array([1.0, np.inf, 1.0], np.float32), "y: contains a non-finite value (inf)"),
    ]
    for y, reason in cases:
        with pytest.raises(InvalidArgument) as caught:
            VALUES.batch(np.ones((3, 1), np.float32), y)
        assert str(caught.value) == f"batch.{reason}"


def test_predict_and_compute_gradients_parts_name_their_own_fields() -> None:
    # Predict and ComputeGradients check x, y and sample_weight one by one, with defaults.
    assert torch.equal(CLASSES.inputs(X), torch.from_numpy(X))
    for call, reason in [
        (lambda: CLASSES.inputs(np.full((1, 2), NAN)), "x: contains a non-finite value (nan)"),
        (lambda: CLASSES.targets(np.array([5]), 1), "y: label 5 is out of range [0, 3)"),
        (
            lambda: CLASSES.weights(np.array([-1.0], np.float32), 1),
            "sample_weight: has a negative weight -1.0",
        ),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert str(caught.value) == reason


def test_a_batch_of_exactly_the_byte_limit_passes_and_one_byte_over_does_not() -> None:
    for weight in (None, W):
        size = X.nbytes + Y.nbytes + (0 if weight is None else weight.nbytes)
        assert BatchChecker(CLASSES_SPEC, max_bytes=size).batch(X, Y, weight).x.shape == (4, 2)
        with pytest.raises(ResourceExhausted) as caught:
            BatchChecker(CLASSES_SPEC, max_bytes=size - 1).batch(X, Y, weight, field="b")
        assert str(caught.value) == (
            f"b: max_batch_bytes: has {size} bytes of tensors, the limit is {size - 1}"
        )


def test_a_batch_needing_exactly_the_activation_limit_passes_and_one_byte_more_does_not() -> None:
    need = 4 * CLASSES.row_bytes
    assert BatchChecker(CLASSES_SPEC, max_activation_bytes=need).batch(X, Y).x.shape == (4, 2)
    with pytest.raises(ResourceExhausted) as caught:
        BatchChecker(CLASSES_SPEC, max_activation_bytes=need - 1).batch(X, Y, field="b")
    assert str(caught.value).startswith(f"b.x: max_activation_bytes: 4 rows need about {need}")


def test_a_value_that_overflows_the_models_dtype_is_refused_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning would be logged per batch
        with pytest.raises(InvalidArgument, match="as float32"):
            CLASSES.batch(np.full((4, 2), 1e300), Y)


def test_the_row_limit_and_the_byte_limit_on_x_alone_name_x() -> None:
    assert BatchChecker(CLASSES_SPEC, max_rows=4).batch(X, Y).x.shape == (4, 2)
    for checker, reason in [
        (BatchChecker(CLASSES_SPEC, max_rows=3), "b.x: max_batch_rows: has 4 rows, the limit is 3"),
        (
            BatchChecker(CLASSES_SPEC, max_bytes=X.nbytes - 1),
            f"b.x: max_batch_bytes: has {X.nbytes} bytes of tensors, the limit is {X.nbytes - 1}",
        ),
    ]:
        with pytest.raises(ResourceExhausted) as caught:
            checker.batch(X, Y, field="b")
        assert str(caught.value) == reason

"""batches.py: what a batch may be, decided before any of it reaches torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradstream.server.batches import BatchChecker
from gradstream.server.config import Settings
from gradstream.server.errors import InvalidArgument, ResourceExhausted
from gradstream.server.spec import check_depth, parse_spec

SMALL = {"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}}
WIDE = parse_spec(
    {"architecture": {"kind": "mlp", "in_features": 1, "out_features": 1, "hidden": [4096]}}
)


def test_a_million_rows_through_a_wide_layer_is_refused_by_the_default_limit() -> None:
    """8 MB on the wire, under max_batch_rows and max_batch_bytes, and about 65 GB of
    activations: refused by the checker, before torch sees the batch."""
    settings = Settings()
    checker = BatchChecker(
        WIDE,
        settings.max_batch_rows,
        settings.max_batch_bytes,
        settings.max_activation_bytes,
    )
    x = np.ones((1_000_000, 1), np.float32)
    with pytest.raises(ResourceExhausted, match="max_activation_bytes"):
        checker.batch(x, x)
    with pytest.raises(ResourceExhausted, match="max_activation_bytes"):
        checker.inputs(x)
    assert checker.inputs(x[:1000]).shape == (1000, 1)


@pytest.mark.parametrize("part", ["x", "y", "sample_weight"])
def test_a_float64_value_finite_only_before_conversion_is_refused(part: str) -> None:
    checker = BatchChecker(WIDE)
    x, y, w = np.ones((2, 1)), np.ones((2, 1)), np.ones(2)
    {"x": x, "y": y, "sample_weight": w}[part][0] = 1e300  # inf as float32
    with pytest.raises(InvalidArgument, match=f"batch.{part}: contains a non-finite value"):
        checker.batch(x, y, w)


def test_bytes_of_a_segment_are_not_quoted_in_reasons() -> None:
    classes = parse_spec(
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 3},
            "loss": {"kind": "cross_entropy"},
        }
    )
    checker = BatchChecker(classes)
    x, y = np.ones((1, 1), np.float32), np.array([1234567], np.int64)
    with pytest.raises(InvalidArgument, match="label 1234567"):
        checker.batch(x, y)
    with pytest.raises(InvalidArgument) as caught:
        checker.batch(x, y, quote=False)
    assert "1234567" not in str(caught.value)
    x[0, 0] = np.nan
    with pytest.raises(InvalidArgument) as caught:
        checker.batch(x, np.array([1]), quote=False)
    assert "nan" not in str(caught.value)


def test_a_spec_deeper_than_the_layer_limit_is_refused_before_it_is_built() -> None:
    deep = parse_spec(
        {"architecture": {"kind": "mlp", "in_features": 1, "out_features": 1, "hidden": [1] * 64}}
    )
    check_depth(deep, 65)
    with pytest.raises(ResourceExhausted, match=r"max_model_layers: .* 65 layers, the limit is 64"):
        check_depth(deep, 64)


def test_a_grad_output_is_floating_finite_and_in_the_models_dtype() -> None:
    checker = BatchChecker(parse_spec(dict(SMALL, dtype="float64")))
    vector = checker.grad_output(np.array([[1.5]], np.float32))
    assert vector.dtype == torch.float64 and vector.tolist() == [[1.5]]
    with pytest.raises(InvalidArgument) as caught:
        checker.grad_output(np.array([[1]], np.int64))
    assert str(caught.value) == "grad_output: has dtype int64, expected floating point"
    float32 = BatchChecker(parse_spec(SMALL))
    with pytest.raises(InvalidArgument) as caught:
        float32.grad_output(np.array([[1e300]]), field="v")
    assert str(caught.value) == "v: contains a non-finite value (inf) as float32"


CTR = parse_spec(
    {
        "architecture": {
            "kind": "embedding_mlp",
            "embeddings": [{"input": "user", "num_embeddings": 10, "dim": 2}],
            "dense_features": 3,
            "out_features": 1,
        }
    }
)


def _ctr(rows: int, bag: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((rows, bag), np.int64), np.zeros((rows, 3), np.float32)


def test_int32_ids_are_widened_and_floats_take_the_model_dtype() -> None:
    checker = BatchChecker(CTR)
    ids, dense = _ctr(2)
    batch = checker.batch(
        ids.astype(np.int32),
        np.zeros((2, 1)),
        more=[dense.astype(np.float64)],
        fields=["b.inputs[user]", "b.inputs[dense]"],
    )
    assert batch.x.dtype == torch.int64 and batch.more[0].dtype == torch.float32
    assert [t.shape for t in batch.inputs] == [(2, 4), (2, 3)]


def test_the_batch_limits_count_every_input() -> None:
    ids, dense = _ctr(8)  # 256 bytes of ids, 96 of dense, 32 of y
    fields = ["b.inputs[user]", "b.inputs[dense]"]
    y = np.zeros((8, 1), np.float32)
    BatchChecker(CTR, max_bytes=384).batch(ids, y, more=[dense], fields=fields)
    with pytest.raises(ResourceExhausted, match=r"max_batch_bytes: has 352 bytes"):
        BatchChecker(CTR, max_bytes=300).features([ids, dense], fields)
    with pytest.raises(ResourceExhausted, match=r"^b: max_batch_bytes: has 384 bytes"):
        BatchChecker(CTR, max_bytes=383).batch(ids, y, field="b", more=[dense], fields=fields)
    with pytest.raises(ResourceExhausted, match=r"b.inputs\[user\]: max_batch_rows: has 8 rows"):
        BatchChecker(CTR, max_rows=7).features([ids, dense], fields)
    with pytest.raises(ResourceExhausted, match="max_activation_bytes"):
        BatchChecker(CTR, max_activation_bytes=8).features([ids, dense], fields)


@pytest.mark.parametrize(
    "spec",
    [
        SMALL,
        {
            "architecture": {"kind": "mlp", "in_features": 3, "hidden": [4], "out_features": 5},
            "loss": {"kind": "cross_entropy"},
            "dtype": "float64",
        },
        {
            "architecture": {
                "kind": "embedding_mlp",
                "embeddings": [{"input": "user", "num_embeddings": 7, "dim": 2}],
                "dense_features": 3,
                "hidden": [4],
                "out_features": 1,
            }
        },
    ],
)
def test_a_checker_rebuilt_from_its_contract_checks_alike(spec: dict[str, object]) -> None:
    """The ingest front's checker (ingest.py) is the model's, rebuilt from its contract."""
    checker = BatchChecker(parse_spec(spec), 5, 4096, 1 << 20)
    rebuilt = BatchChecker.from_contract(checker.contract())
    assert vars(rebuilt) == vars(checker)
    assert rebuilt.contract() == checker.contract()

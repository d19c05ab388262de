"""evaluation.py: streamed metrics equal the hand and textbook values, however batches split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from gradstream.server.errors import InvalidArgument, ResourceExhausted
from gradstream.server.evaluation import Evaluation, RankCounts
from gradstream.server.models import loss_value
from gradstream.server.spec import parse_spec


def _spec(loss: str, out: int = 1, reduction: str = "mean") -> Any:
    return parse_spec(
        {
            "architecture": {"kind": "linear", "in_features": 2, "out_features": out},
            "loss": {"kind": loss, "reduction": reduction},
        }
    )


def _evaluate(
    spec: Any,
    out: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None = None,
    splits: int = 1,
    top_k: tuple[int, ...] = (),
) -> dict[str, float]:
    evaluation = Evaluation(spec, top_k)
    for index in np.array_split(np.arange(out.shape[0]), splits):
        i = torch.from_numpy(index)
        evaluation.add(out[i], y[i], None if w is None else w[i])
    return evaluation.result()


def test_roc_auc_with_ties_is_the_hand_computed_value() -> None:
    # Positives score 0.35, 0.8, 0.4; negatives 0.1, 0.4, 0.1. Pairs won: 0.35 beats two,
    # 0.8 three, 0.4 two and ties one: (2 + 3 + 2.5) / 9. scikit-learn's trapezoid through
    # (0, 0) (0, 1/3) (1/3, 2/3) (1/3, 1) (1, 1) has the same area, 5/6.
    scores = torch.tensor([[0.1], [0.4], [0.35], [0.8], [0.4], [0.1]], dtype=torch.float64)
    labels = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
    for splits in (1, 2, 6):
        got = _evaluate(_spec("bce_with_logits"), scores, labels, splits=splits)
        assert got["roc_auc"] == pytest.approx(5 / 6, abs=1e-15)
    # Logit > 0 is the class-1 prediction: every score is positive, so 3 of 6 are right.
    assert got["accuracy"] == 0.5


def test_roc_auc_all_tied_is_one_half_and_one_class_has_none() -> None:
    scores = torch.zeros(4, 1)
    got = _evaluate(_spec("bce_with_logits"), scores, torch.tensor([[0.0], [1.0], [1.0], [0.0]]))
    assert got["roc_auc"] == 0.5
    one_class = _evaluate(_spec("bce_with_logits"), scores, torch.ones(4, 1))
    assert "roc_auc" not in one_class
    assert one_class["accuracy"] == 0.0  # logit 0 is not > 0: class 0 predicted


def test_rank_counts_merge_many_chunks_into_the_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 50, 5000).astype(np.float64)  # many ties
    positive = rng.random(5000) < 0.3
    counts = RankCounts(max_scores=100)
    for part in np.array_split(np.arange(5000), 37):
        counts.add(scores[part], positive[part])
    p, n = scores[positive], scores[~positive]
    pairs = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    assert counts.roc_auc() == pytest.approx(pairs / (p.size * n.size), abs=1e-12)


def test_rank_counts_past_the_bound_name_the_setting() -> None:
    counts = RankCounts(max_scores=10)
    counts.add(np.arange(8, dtype=np.float64), np.arange(8) % 2 == 0)
    with pytest.raises(ResourceExhausted, match=r"eval_auc_max_scores.*11.*limit is 10"):
        counts.add(np.arange(8, 11, dtype=np.float64), np.ones(3, dtype=bool))
        counts.roc_auc()


def test_binary_log_loss_and_loss_are_the_textbook_bce() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 1, generator=g, dtype=torch.float64)
    y = (torch.rand(50, 1, generator=g) < 0.5).double()
    got = _evaluate(_spec("bce_with_logits"), logits, y, splits=7)
    textbook = F.binary_cross_entropy_with_logits(logits, y).item()
    assert got["log_loss"] == pytest.approx(textbook, rel=1e-12)
    assert got["loss"] == pytest.approx(textbook, rel=1e-12)


def test_regression_metrics_are_the_hand_computed_values() -> None:
    # Errors 0, 0, 0, 1: mse = mae = 1/4, rmse = 1/2; SS_res = 1, SS_tot = 5: r2 = 0.8.
    out = torch.tensor([[1.0], [2.0], [3.0], [5.0]])
    y = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    for splits in (1, 3):
        got = _evaluate(_spec("mse"), out, y, splits=splits)
        assert got == pytest.approx(
            {"loss": 0.25, "mse": 0.25, "mae": 0.25, "rmse": 0.5, "r2": 0.8}
        )


def test_r2_is_the_column_average_and_a_constant_target_follows_scikit_learn() -> None:
    out = torch.tensor([[1.0, 7.0], [2.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    y = torch.tensor([[1.0, 7.0], [2.0, 7.0], [3.0, 7.0], [4.0, 7.0]])
    # Column 0 as above (0.8); column 1 is constant and exactly predicted: 1.0.
    assert _evaluate(_spec("mse", out=2), out, y, splits=2)["r2"] == pytest.approx(0.9)
    off = out.clone()
    off[:, 1] = 8.0  # constant target, missed: 0.0
    assert _evaluate(_spec("mse", out=2), off, y)["r2"] == pytest.approx(0.4)


def test_r2_streamed_equals_the_textbook_on_large_offsets() -> None:
    g = torch.Generator().manual_seed(2)
    y = 1e6 + torch.randn(1000, 3, generator=g, dtype=torch.float64)
    out = y + 0.5 * torch.randn(1000, 3, generator=g, dtype=torch.float64)
    got = _evaluate(_spec("mse", out=3), out, y, splits=13)
    ss_res = ((out - y) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    assert got["r2"] == pytest.approx((1 - ss_res / ss_tot).mean().item(), rel=1e-9)
    assert got["mse"] == pytest.approx(F.mse_loss(out, y).item(), rel=1e-12)
    assert got["mae"] == pytest.approx(F.l1_loss(out, y).item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["mse", "l1", "huber", "bce_with_logits", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_weighted_and_reduced_like_training(kind: str, reduction: str) -> None:
    out_features = 3
    spec = _spec(kind, out=out_features, reduction=reduction)
    g = torch.Generator().manual_seed(3)
    out = torch.randn(40, out_features, generator=g, dtype=torch.float64)
    if kind == "cross_entropy":
        y = torch.randint(0, out_features, (40,), generator=g)
    elif kind == "bce_with_logits":
        y = torch.rand(40, out_features, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(40, out_features, generator=g, dtype=torch.float64)
    w = torch.rand(40, generator=g, dtype=torch.float64)
    # The whole set as one training batch: training's loss on it.
    expected = loss_value(spec.loss, out, y, w).item()
    assert _evaluate(spec, out, y, w, splits=6)["loss"] == pytest.approx(expected, rel=1e-12)
    unweighted = loss_value(spec.loss, out, y, None).item()
    assert _evaluate(spec, out, y, splits=5)["loss"] == pytest.approx(unweighted, rel=1e-12)


def test_multiclass_accuracy_and_top_k_with_a_tie() -> None:
    out = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # label 0: top 1
            [3.0, 2.0, 1.0],  # label 1: top 2
            [3.0, 2.0, 1.0],  # label 2: top 3
            [1.0, 2.0, 2.0],  # label 1: tied first with class 2, counts in top 1
        ]
    )
    y = torch.tensor([0, 1, 2, 1])
    got = _evaluate(_spec("cross_entropy", out=3), out, y, splits=2, top_k=(1, 2, 3))
    # argmax takes the first of tied classes: row 3 predicts class 1, right.
    assert got["accuracy"] == 0.5
    assert got["top_1_accuracy"] == 0.5
    assert got["top_2_accuracy"] == 0.75
    assert got["top_3_accuracy"] == 1.0
    assert got["cross_entropy"] == pytest.approx(F.cross_entropy(out.double(), y).item())
    assert got["loss"] == pytest.approx(got["cross_entropy"])


def test_top_k_outside_the_classes_or_on_another_task_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"open.top_k.*k=4 is outside \[1, 3\]"):
        Evaluation(_spec("cross_entropy", out=3), top_k=(1, 4))
    with pytest.raises(InvalidArgument, match=r"open.top_k.*loss is mse"):
        Evaluation(_spec("mse"), top_k=(1,))
    with pytest.raises(InvalidArgument, match="no batches"):
        Evaluation(_spec("mse")).result()


def test_float32_outputs_are_evaluated_in_float64() -> None:
    out = torch.tensor([[1e8], [1.0]], dtype=torch.float32)
    y = torch.tensor([[0.0], [0.0]], dtype=torch.float32)
    got = _evaluate(_spec("mse"), out, y)
    assert got["mse"] == (1e16 + 1) / 2
    assert math.isclose(got["rmse"], math.sqrt((1e16 + 1) / 2))

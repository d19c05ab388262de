"""Evaluating a model on held-out batches: the loss as training weighs it, and task metrics.

An ``Evaluation`` accumulates over the batches of one Evaluate stream and answers once.
The task follows the loss: ``mse``, ``l1`` and ``huber`` are regression,
``bce_with_logits`` is binary classification with logits, ``cross_entropy`` is
multiclass. Definitions are in docs/evaluation.md. Everything is accumulated in
float64; no graph is built and the model is never stepped (the caller runs the forward
pass in inference mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F  # noqa: N812

from gradstream.server.errors import InvalidArgument, ResourceExhausted
from gradstream.server.spec import ModelSpec

if TYPE_CHECKING:
    from gradstream.server.batches import Batch
    from gradstream.server.engine import Trainer

Array = npt.NDArray[Any]
REGRESSION = ("mse", "l1", "huber")


def task_of(spec: ModelSpec) -> str:
    """``regression``, ``binary`` or ``multiclass``: what the model's loss says it predicts."""
    if spec.loss.kind == "cross_entropy":
        return "multiclass"
    if spec.loss.kind == "bce_with_logits":
        return "binary"
    return "regression"


def check_top_k(
    spec: ModelSpec, top_k: Sequence[int], field: str = "open.top_k"
) -> tuple[int, ...]:
    """The distinct k of a request, each in [1, classes]; only multiclass models take any."""
    ks = tuple(sorted(set(top_k)))
    if not ks:
        return ks
    if task_of(spec) != "multiclass":
        raise InvalidArgument(
            field,
            f"top-k accuracy needs a cross_entropy model, this one's loss is {spec.loss.kind}",
        )
    classes = spec.architecture.out_features
    for k in ks:
        if not 1 <= k <= classes:
            raise InvalidArgument(field, f"k={k} is outside [1, {classes}] (the model's classes)")
    return ks


class _Moments:
    """Count, mean and sum of squared deviations per column, merged batch by batch.

    Chan et al.'s pairwise update: no cancellation from subtracting large sums.
    """

    def __init__(self, columns: int) -> None:
        self.count = 0
        self.mean = np.zeros(columns)
        self.m2 = np.zeros(columns)

    def add(self, values: Array) -> None:
        n = values.shape[0]
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


class RankCounts:
    """Positives and negatives per distinct score: ROC AUC exactly, ties included.

    Memory grows with the distinct scores, not the rows: new scores wait in chunks that
    are merged into the sorted table once they outgrow it, so at most about twice
    ``max_scores`` entries are held. Past ``max_scores`` distinct scores it raises
    ResourceExhausted naming the setting.
    """

    def __init__(self, max_scores: int) -> None:
        self.max_scores = max_scores
        self._scores = np.zeros(0)
        self._positives = np.zeros(0, dtype=np.int64)
        self._negatives = np.zeros(0, dtype=np.int64)
        self._chunks: list[tuple[Array, Array]] = []
        self._pending = 0

    def add(self, scores: Array, positive: Array) -> None:
        """Count rows: ``scores`` float64, ``positive`` bool, both of one length."""
        self._chunks.append((scores, positive))
        self._pending += scores.shape[0]
        if self._pending > max(self._scores.shape[0], 1024):
            self._merge()

    def _merge(self) -> None:
        if not self._chunks:
            return
        new_positive = np.concatenate([p for _, p in self._chunks])
        scores = np.concatenate([self._scores, *(s for s, _ in self._chunks)])
        # Table entries carry their counts; each new row counts 1 in one of the two.
        positive = np.concatenate([self._positives, new_positive.astype(np.int64)])
        negative = np.concatenate([self._negatives, (~new_positive).astype(np.int64)])
        unique, inverse = np.unique(scores, return_inverse=True)
        self._scores = unique
        # bincount sums its weights in float64: exact for counts below 2**53.
        self._positives = np.bincount(inverse, positive, unique.shape[0]).astype(np.int64)
        self._negatives = np.bincount(inverse, negative, unique.shape[0]).astype(np.int64)
        self._chunks.clear()
        self._pending = 0
        if unique.shape[0] > self.max_scores:
            raise ResourceExhausted(
                f"eval_auc_max_scores: roc_auc keeps one entry per distinct score and this "
                f"evaluation has {unique.shape[0]}, the limit is {self.max_scores}"
            )

    def roc_auc(self) -> float | None:
        """The area under the ROC curve, or None when only one class was seen.

        With ties it is scikit-learn's ``roc_auc_score``: the trapezoid through the
        points of its thresholds, which is ``(#{s_p > s_n} + #{s_p == s_n} / 2) / (P * N)``
        over every (positive, negative) pair.
        """
        self._merge()
        p_total = int(self._positives.sum())
        n_total = int(self._negatives.sum())
        if p_total == 0 or n_total == 0:
            return None
        # Ascending scores: each positive beats the negatives of lower scores, ties half.
        negatives_below = np.cumsum(self._negatives) - self._negatives
        wins = (self._positives * (negatives_below + self._negatives / 2)).sum()
        return float(wins / (p_total * n_total))


class Evaluation:
    """The running loss and metrics of one Evaluate stream of one model."""

    def __init__(
        self, spec: ModelSpec, top_k: Sequence[int] = (), max_auc_scores: int = 1_000_000
    ) -> None:
        self.spec = spec
        self.task = task_of(spec)
        self.top_k = check_top_k(spec, top_k)
        self.rows = 0
        self._weighted_loss = 0.0  # sum of w_i * l_i
        self._weight = 0.0  # sum of w_i
        self._elements = 0  # output elements seen (regression, binary)
        self._sums: dict[str, float] = {}
        columns = spec.architecture.out_features
        self._targets = _Moments(columns)
        self._squared_error = np.zeros(columns)
        self._ranks = RankCounts(max_auc_scores)

    def add(self, output: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Count one batch: the model's output on it, its targets and optional row weights."""
        out = output.detach().to("cpu", torch.float64)
        rows = out.shape[0]
        target = y.detach().cpu()
        if self.task != "multiclass":
            target = target.to(torch.float64).reshape(out.shape)
        w = (
            torch.ones(rows, dtype=torch.float64)
            if weight is None
            else weight.detach().to("cpu", torch.float64)
        )
        row_loss = self._row_loss(out, target)
        self._weighted_loss += float((w * row_loss).sum())
        self._weight += float(w.sum())
        self.rows += rows
        match self.task:
            case "regression":
                self._add_regression(out.numpy(), target.numpy())
            case "binary":
                self._add_binary(out, target)
            case "multiclass":
                self._add_multiclass(out, target, row_loss)

    def _row_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """l_i: row i's loss, reduced over its own elements the way training reduces it."""
        loss = self.spec.loss
        match loss.kind:
            case "mse":
                per_element = F.mse_loss(out, target, reduction="none")
            case "l1":
                per_element = F.l1_loss(out, target, reduction="none")
            case "huber":
                per_element = F.huber_loss(out, target, reduction="none", delta=loss.delta)
            case "bce_with_logits":
                per_element = F.binary_cross_entropy_with_logits(out, target, reduction="none")
            case "cross_entropy":
                return F.cross_entropy(out, target, reduction="none")
        return per_element.mean(1) if loss.reduction == "mean" else per_element.sum(1)

    def _add(self, name: str, value: float) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value

    def _add_regression(self, out: Array, target: Array) -> None:
        error = out - target
        self._elements += error.size
        self._add("squared_error", float((error**2).sum()))
        self._add("absolute_error", float(np.abs(error).sum()))
        self._squared_error += (error**2).sum(axis=0)
        self._targets.add(target)

    def _add_binary(self, out: torch.Tensor, target: torch.Tensor) -> None:
        self._elements += out.numel()
        bce = F.binary_cross_entropy_with_logits(out, target, reduction="sum")
        self._add("log_loss", float(bce))
        positive = target >= 0.5
        self._add("correct", float(((out > 0) == positive).sum()))
        self._ranks.add(out.reshape(-1).numpy(), positive.reshape(-1).numpy())

    def _add_multiclass(
        self, out: torch.Tensor, target: torch.Tensor, row_loss: torch.Tensor
    ) -> None:
        self._add("cross_entropy", float(row_loss.sum()))
        self._add("correct", float((out.argmax(1) == target).sum()))
        if self.top_k:
            true_logit = out.gather(1, target.reshape(-1, 1))
            # Rank of the true class, ties in its favour: classes strictly above it.
            above = (out > true_logit).sum(1)
            for k in self.top_k:
                self._add(f"top_{k}", float((above < k).sum()))

    def result(self) -> dict[str, float]:
        """``loss`` and the task's metrics over every row added so far."""
        if self.rows == 0:
            raise InvalidArgument("batches", "the evaluation received no batches")
        loss = self._weighted_loss
        if self.spec.loss.reduction == "mean":
            loss /= self._weight
        metrics = {"loss": loss}
        s = self._sums
        match self.task:
            case "regression":
                mse = s["squared_error"] / self._elements
                metrics |= {
                    "mse": mse,
                    "mae": s["absolute_error"] / self._elements,
                    "rmse": math.sqrt(mse),
                    "r2": self._r2(),
                }
            case "binary":
                metrics |= {
                    "log_loss": s["log_loss"] / self._elements,
                    "accuracy": s["correct"] / self._elements,
                }
                auc = self._ranks.roc_auc()
                if auc is not None:
                    metrics["roc_auc"] = auc
            case "multiclass":
                metrics |= {
                    "cross_entropy": s["cross_entropy"] / self.rows,
                    "accuracy": s["correct"] / self.rows,
                }
                for k in self.top_k:
                    metrics[f"top_{k}_accuracy"] = s[f"top_{k}"] / self.rows
        return metrics

    def _r2(self) -> float:
        """Per output column, averaged uniformly (scikit-learn's ``r2_score`` default)."""
        scores = []
        for residual, total in zip(self._squared_error, self._targets.m2, strict=True):
            if total == 0:
                # scikit-learn's force_finite: a constant target is explained perfectly or not.
                scores.append(1.0 if residual == 0 else 0.0)
            else:
                scores.append(1.0 - residual / total)
        return float(np.mean(scores))


def evaluate_batches(trainer: Trainer, evaluation: Evaluation, batches: Sequence[Batch]) -> int:
    """On the model's worker: each batch's forward pass in inference mode, counted.

    Returns the step the model was at: nothing here steps it.
    """
    for batch in batches:
        evaluation.add(trainer.predict(*batch.inputs), batch.y, batch.weight)
    return trainer.step

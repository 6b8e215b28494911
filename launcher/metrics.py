"""Evaluation metrics as pure functions over numbers: no model, no Ray, no I/O.

The batch stage collects per-row statistics (token NLL sums and counts, predicted and true
class ids, generated and reference texts) and hands them to these functions once, over the
whole evaluation set, so nothing here is a mean of per-batch means.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

# The evaluation metrics each task can compute: the recipe, the batch stage and the training
# loop's per-source metrics all read this one table.
METRICS_BY_TASK: dict[str, tuple[str, ...]] = {
    "causal_lm": ("loss", "perplexity", "exact_match"),
    "classification": ("loss", "accuracy", "precision", "recall", "f1"),
}

__all__ = [
    "METRICS_BY_TASK",
    "accuracy",
    "classification_metrics",
    "confusion_matrix",
    "exact_match",
    "mean_loss",
    "normalize_whitespace",
    "perplexity",
    "precision_recall_f1",
    "token_weighted_loss",
]


def token_weighted_loss(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Mean negative log-likelihood per token over the whole set: sum(NLL) / sum(tokens).

    Rows with many tokens weigh more than short ones, as in a single pass over all tokens.
    """
    total_tokens = float(np.sum(np.asarray(token_counts, dtype=np.float64)))
    if total_tokens <= 0:
        raise ValueError("no tokens to score: every row was empty or fully masked")
    return float(np.sum(np.asarray(nll_sums, dtype=np.float64)) / total_tokens)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(total NLL / total tokens); inf when that overflows rather than an error."""
    loss = token_weighted_loss(nll_sums, token_counts)
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def mean_loss(row_losses: Sequence[float]) -> float:
    """Plain mean of one loss per row (classification cross-entropy)."""
    values = np.asarray(row_losses, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no rows to average")
    return float(values.mean())


def _as_ids(values: Sequence[int], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} holds a negative class id ({int(array.min())})")
    return array


def _checked_pair(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    true, pred = _as_ids(y_true, "y_true"), _as_ids(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} rows but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("no rows to evaluate")
    return true, pred


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of rows whose predicted class equals the true class."""
    true, pred = _checked_pair(y_true, y_pred)
    return float(np.mean(true == pred))


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None
) -> np.ndarray:
    """Counts [true class, predicted class]; classes are 0..num_classes-1."""
    true, pred = _checked_pair(y_true, y_pred)
    needed = int(max(true.max(), pred.max())) + 1
    size = needed if num_classes is None else num_classes
    if size < needed:
        raise ValueError(f"class id {needed - 1} is out of range for {num_classes} classes")
    matrix = np.zeros((size, size), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    return matrix


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (no NaN)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def precision_recall_f1(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None
) -> dict[str, object]:
    """Per-class and macro precision, recall and F1.

    A class never predicted has precision 0 (not NaN); a class absent from y_true has recall 0.
    Macro averages run over the classes that occur in y_true or y_pred, so a declared label
    that never shows up at all does not drag the average down.
    """
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = _safe_ratio(true_pos, predicted)
    recall = _safe_ratio(true_pos, actual)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    present = (predicted + actual) > 0
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": actual.astype(np.int64).tolist(),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
    }


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict[str, object]:
    """Accuracy, macro and per-label precision/recall/F1, and the confusion matrix."""
    scores = precision_recall_f1(y_true, y_pred, len(labels))
    per_label = {
        name: {
            "precision": scores["precision"][i],
            "recall": scores["recall"][i],
            "f1": scores["f1"][i],
            "support": scores["support"][i],
        }
        for i, name in enumerate(labels)
    }
    return {
        "accuracy": accuracy(y_true, y_pred),
        "precision": scores["precision_macro"],
        "recall": scores["recall_macro"],
        "f1": scores["f1_macro"],
        "per_label": per_label,
        "confusion_matrix": {
            "labels": list(labels),
            "matrix": confusion_matrix(y_true, y_pred, len(labels)).tolist(),
        },
    }


_SPACES = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    """Trim and collapse every run of whitespace to one space."""
    return _SPACES.sub(" ", text).strip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise ValueError("no rows to evaluate")
    hits = sum(
        normalize_whitespace(p) == normalize_whitespace(r)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)

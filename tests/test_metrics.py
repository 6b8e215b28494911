"""Every metric against a direct computation written out by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from launcher import metrics

# Three classes; class 2 occurs in y_true but is never predicted.
Y_TRUE = [0, 0, 1, 1, 1, 2, 2, 0, 1, 2]
Y_PRED = [0, 1, 1, 1, 0, 1, 0, 0, 1, 1]


def reference_counts(y_true, y_pred, cls):
    tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == cls and p == cls)
    fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t != cls and p == cls)
    fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == cls and p != cls)
    return tp, fp, fn


def reference_prf(y_true, y_pred, cls):
    tp, fp, fn = reference_counts(y_true, y_pred, cls)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def test_accuracy_matches_counting():
    expected = sum(t == p for t, p in zip(Y_TRUE, Y_PRED, strict=True)) / len(Y_TRUE)
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(expected)
    assert expected == pytest.approx(0.5)


def test_confusion_matrix_matches_counting():
    expected = [[0] * 3 for _ in range(3)]
    for t, p in zip(Y_TRUE, Y_PRED, strict=True):
        expected[t][p] += 1
    got = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert got.tolist() == expected
    assert got.tolist() == [[2, 1, 0], [1, 3, 0], [1, 2, 0]]


def test_confusion_matrix_rejects_out_of_range_class():
    with pytest.raises(ValueError, match="out of range"):
        metrics.confusion_matrix([0, 3], [0, 0], 2)


def test_per_class_and_macro_scores_with_a_class_never_predicted():
    got = metrics.precision_recall_f1(Y_TRUE, Y_PRED, 3)
    per_class = [reference_prf(Y_TRUE, Y_PRED, c) for c in range(3)]
    for cls, (precision, recall, f1) in enumerate(per_class):
        assert got["precision"][cls] == pytest.approx(precision)
        assert got["recall"][cls] == pytest.approx(recall)
        assert got["f1"][cls] == pytest.approx(f1)
    # Class 2 is never predicted: precision 0 and F1 0, not NaN.
    assert got["precision"][2] == 0.0 and got["f1"][2] == 0.0
    assert not any(math.isnan(v) for key in ("precision", "recall", "f1") for v in got[key])
    assert got["precision_macro"] == pytest.approx(sum(p for p, _, _ in per_class) / 3)
    assert got["recall_macro"] == pytest.approx(sum(r for _, r, _ in per_class) / 3)
    assert got["f1_macro"] == pytest.approx(sum(f for _, _, f in per_class) / 3)
    assert got["support"] == [3, 4, 3]


def test_macro_leaves_out_a_declared_class_that_never_occurs():
    # Label 3 is declared but appears neither in truth nor predictions.
    got = metrics.precision_recall_f1(Y_TRUE, Y_PRED, 4)
    per_class = [reference_prf(Y_TRUE, Y_PRED, c) for c in range(3)]
    assert got["f1_macro"] == pytest.approx(sum(f for _, _, f in per_class) / 3)
    assert got["precision"][3] == 0.0 and got["recall"][3] == 0.0


def test_matches_scikit_learn_when_available():
    sk = pytest.importorskip("sklearn.metrics")
    got = metrics.precision_recall_f1(Y_TRUE, Y_PRED, 3)
    p, r, f, _ = sk.precision_recall_fscore_support(
        Y_TRUE, Y_PRED, labels=[0, 1, 2], zero_division=0
    )
    assert got["precision"] == pytest.approx(p.tolist())
    assert got["recall"] == pytest.approx(r.tolist())
    assert got["f1"] == pytest.approx(f.tolist())
    assert got["f1_macro"] == pytest.approx(
        sk.f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0)
    )


def test_classification_metrics_names_labels():
    got = metrics.classification_metrics(Y_TRUE, Y_PRED, ["neg", "pos", "mixed"])
    assert got["accuracy"] == pytest.approx(0.5)
    assert set(got["per_label"]) == {"neg", "pos", "mixed"}
    assert got["per_label"]["mixed"]["precision"] == 0.0
    assert got["per_label"]["pos"]["support"] == 4
    assert got["confusion_matrix"]["labels"] == ["neg", "pos", "mixed"]
    assert got["confusion_matrix"]["matrix"][2] == [1, 2, 0]


def test_loss_and_perplexity_weight_tokens_not_batches():
    nll_sums = [2.0, 9.0, 0.5]
    counts = [1, 10, 2]
    total_nll, total_tokens = 11.5, 13
    assert metrics.token_weighted_loss(nll_sums, counts) == pytest.approx(total_nll / total_tokens)
    assert metrics.perplexity(nll_sums, counts) == pytest.approx(math.exp(total_nll / total_tokens))
    mean_of_means = np.mean([s / c for s, c in zip(nll_sums, counts, strict=True)])
    assert metrics.token_weighted_loss(nll_sums, counts) != pytest.approx(mean_of_means)


def test_perplexity_overflow_is_inf_and_empty_is_an_error():
    assert metrics.perplexity([1e6], [1]) == math.inf
    with pytest.raises(ValueError, match="no tokens"):
        metrics.perplexity([0.0], [0])


def test_mean_loss():
    assert metrics.mean_loss([0.5, 1.5, 1.0]) == pytest.approx(1.0)


def test_exact_match_normalises_whitespace():
    predictions = ["Paris", "  the  cat\n sat ", "42", "no"]
    references = ["Paris ", "the cat sat", "41", "No"]
    expected = sum(
        " ".join(p.split()) == " ".join(r.split())
        for p, r in zip(predictions, references, strict=True)
    ) / len(predictions)
    assert metrics.exact_match(predictions, references) == pytest.approx(expected)
    assert expected == pytest.approx(0.5)


def test_mismatched_lengths_are_errors():
    with pytest.raises(ValueError, match="3 rows but y_pred has 2"):
        metrics.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="must pair up"):
        metrics.exact_match(["a"], [])

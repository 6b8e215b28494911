"""Distillation: the loss against an independent float64 reference, the student that learns
from its teacher, students built from teacher layers, and the vocabulary check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from launcher.objectives import distillation_loss, kl_to_teacher, task_loss, topk_kl_to_teacher


def reference_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def reference_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True)))


def reference_causal(student, teacher, labels, temperature, alpha) -> tuple[float, float]:
    """Loops in float64: position t is distilled when labels[t + 1] is not -100."""
    s, t, y = (x.numpy().astype(np.float64) for x in (student, teacher, labels))
    kls, nlls = [], []
    for b in range(s.shape[0]):
        for pos in range(s.shape[1] - 1):
            if y[b, pos + 1] == -100:
                continue
            kls.append(
                reference_kl(
                    reference_softmax(t[b, pos], temperature),
                    reference_softmax(s[b, pos], temperature),
                )
            )
            probs = reference_softmax(s[b, pos], 1.0)
            nlls.append(-math.log(probs[int(y[b, pos + 1])]))
    kl, nll = float(np.mean(kls)), float(np.mean(nlls))
    return alpha * nll + (1 - alpha) * temperature**2 * kl, temperature**2 * kl


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.5), (3.5, 0.2)])
def test_causal_loss_matches_float64_reference_with_masking_and_t_squared(temperature, alpha):
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(3, 6, 11, generator=gen) * 3
    teacher = torch.randn(3, 6, 11, generator=gen) * 3
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 4:] = -100  # right padding
    hard = task_loss(student, labels, "causal_lm")
    kl = kl_to_teacher(student, teacher, labels, "causal_lm", temperature)
    loss, distill = distillation_loss(hard, kl, alpha, temperature)
    want_loss, want_distill = reference_causal(student, teacher, labels, temperature, alpha)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(distill) == pytest.approx(want_distill, rel=1e-5)


def test_masked_positions_do_not_matter():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 7, generator=gen)
    teacher = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[:, 3:] = -100
    changed = teacher.clone()
    changed[:, 2:] += 50 * torch.randn(
        2, 3, 7, generator=gen
    )  # positions 2.. predict masked tokens
    a = kl_to_teacher(student, teacher, labels, "causal_lm", 2.0)
    b = kl_to_teacher(student, changed, labels, "causal_lm", 2.0)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_classification_loss_is_sequence_level():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(5, 3, generator=gen)
    teacher = torch.randn(5, 3, generator=gen)
    labels = torch.randint(0, 3, (5,), generator=gen)
    kl = kl_to_teacher(student, teacher, labels, "classification", 2.0)
    want = np.mean(
        [
            reference_kl(
                reference_softmax(teacher[i].double().numpy(), 2.0),
                reference_softmax(student[i].double().numpy(), 2.0),
            )
            for i in range(5)
        ]
    )
    assert float(kl) == pytest.approx(want, rel=1e-5)
    loss, _ = distillation_loss(task_loss(student, labels, "classification"), kl, 1.0, 2.0)
    assert float(loss) == pytest.approx(float(task_loss(student, labels, "classification")))


def test_identical_distributions_give_zero_kl_and_gradients_reach_only_the_student():
    logits = torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    student = logits.clone().requires_grad_(True)
    teacher = logits.clone().requires_grad_(True)
    kl = kl_to_teacher(student, teacher, labels, "causal_lm", 2.0)
    assert float(kl.detach()) == pytest.approx(0.0, abs=1e-6)
    (kl + (student**2).sum() * 0).backward()
    assert teacher.grad is None


def test_topk_kl_is_the_renormalised_reference_and_full_k_equals_full_kl():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 10, generator=gen) * 2
    teacher = torch.randn(2, 5, 10, generator=gen) * 2
    labels = torch.randint(0, 10, (2, 5), generator=gen)
    labels[1, :2] = -100
    logprobs = torch.log_softmax(teacher, -1)
    for k in (3, 10):
        top, ids = logprobs.topk(k, dim=-1)
        got = topk_kl_to_teacher(student, top, ids, labels, "causal_lm", 2.0)
        kls = []
        for b in range(2):
            for pos in range(4):
                if labels[b, pos + 1] == -100:
                    continue
                sel = ids[b, pos].numpy()
                p = reference_softmax(teacher[b, pos].double().numpy()[sel], 2.0)
                q = reference_softmax(student[b, pos].double().numpy()[sel], 2.0)
                kls.append(reference_kl(p, q))
        assert float(got) == pytest.approx(float(np.mean(kls)), rel=1e-5)
    full = kl_to_teacher(student, teacher, labels, "causal_lm", 2.0)
    assert float(got) == pytest.approx(float(full), rel=1e-5)  # k = vocabulary: nothing left out

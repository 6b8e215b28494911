"""Training objectives: what loss a batch gives, and how many tokens it carried."""

from __future__ import annotations

from collections.abc import Callable

import torch

from launcher.collate import IGNORE_INDEX, model_inputs


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real (non-padding) tokens in a batch, as a tensor on the batch's device: summed into the
    report window without a device sync per micro-step."""
    # Packed batches carry no attention_mask (see launcher.collate); num_tokens always exists.
    if "num_tokens" in batch:
        return batch["num_tokens"].sum()
    return batch["attention_mask"].sum()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy: next-token over labelled positions (causal LM), or per sequence."""
    if task == "causal_lm":
        # Shift the labels, not the logits: position i predicts label i + 1, the last position
        # predicts nothing; no copy of the (batch, length, vocab) logits is made.
        shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
    return torch.nn.functional.cross_entropy(logits.float(), labels.view(-1))


def align_logits(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Drop logits of virtual tokens that prompt/prefix methods prepend to the sequence."""
    if task == "causal_lm" and logits.size(1) > labels.size(1):
        return logits[:, -labels.size(1) :, :]
    return logits


def compute_loss(
    model, batch: dict[str, torch.Tensor], task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a batch and return (mean loss, tokens in the batch)."""
    out = model(**model_inputs(batch))
    logits = align_logits(out.logits, batch["labels"], task)
    return task_loss(logits, batch["labels"], task), count_tokens(batch)


def eval_sums(
    model, batch: dict[str, torch.Tensor], task: str, num_labels: int = 0
) -> dict[str, torch.Tensor]:
    """Sums over a batch that reduce exactly across batches and workers.

    Causal LM: summed token NLL and labelled-token count (for token-weighted perplexity).
    Classification: summed NLL, example count, correct count, and per-class TP/FP/FN for F1.
    """
    out = model(**model_inputs(batch))
    labels = batch["labels"]
    logits = align_logits(out.logits, labels, task).float()
    if task == "causal_lm":
        shift_logits = logits[:, :-1, :]
        shift_labels = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        count = (shift_labels != IGNORE_INDEX).sum()
        return {"nll": nll.detach(), "count": count.to(torch.float64)}
    labels = labels.view(-1)
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    pred = logits.argmax(-1)
    classes = torch.arange(num_labels, device=labels.device)
    tp = ((pred[:, None] == classes) & (labels[:, None] == classes)).sum(0)
    fp = ((pred[:, None] == classes) & (labels[:, None] != classes)).sum(0)
    fn = ((pred[:, None] != classes) & (labels[:, None] == classes)).sum(0)
    return {
        "nll": nll.detach(),
        "count": torch.tensor(float(labels.numel()), device=labels.device),
        "correct": (pred == labels).sum().to(torch.float64),
        "tp": tp.to(torch.float64),
        "fp": fp.to(torch.float64),
        "fn": fn.to(torch.float64),
    }


def eval_metrics(sums: dict[str, torch.Tensor], task: str) -> dict[str, float]:
    """Metrics from reduced sums: eval_loss and eval_perplexity, or eval_accuracy and eval_f1."""
    count = max(float(sums["count"]), 1.0)
    loss = float(sums["nll"]) / count
    if task == "causal_lm":
        return {"eval_loss": loss, "eval_perplexity": float(torch.exp(torch.tensor(loss)))}
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return {
        "eval_loss": loss,
        "eval_accuracy": float(sums["correct"]) / count,
        "eval_f1": float(f1.mean()),
    }


# ------------------------------------------------------------------------------ distillation


def _distill_positions(
    student: torch.Tensor, labels: torch.Tensor, task: str, *others: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Rows of per-position tensors that take part in distillation, flattened to [N, ...].

    Causal LM: the logits at position t predict token t + 1, so they count where labels[t + 1]
    is not -100 (the same positions the task loss uses). Classification: every sequence.
    """
    if task != "causal_lm":
        return (student, *others)
    keep = labels[:, 1:] != IGNORE_INDEX
    return tuple(x[:, :-1][keep] for x in (student, *others))


def kl_to_teacher(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    temperature: float,
) -> torch.Tensor:
    """Mean KL(teacher_T || student_T) over labelled positions (causal LM) or sequences.

    Both distributions are softened by the temperature T. When the two models' output layers
    differ in size (embedding matrices padded beyond the shared vocabulary), only the shared
    leading entries are compared.
    """
    width = min(student_logits.size(-1), teacher_logits.size(-1))
    student, teacher = _distill_positions(
        student_logits[..., :width], labels, task, teacher_logits[..., :width]
    )
    if student.numel() == 0:
        return student_logits.sum() * 0.0
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def topk_kl_to_teacher(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    temperature: float,
) -> torch.Tensor:
    """Mean KL over the teacher's stored top-k entries, both sides renormalised over them.

    `teacher_logprobs` / `teacher_ids` hold, per position, the teacher's k most likely entries
    (log-probabilities at temperature 1). Restricted to those k entries, softmax(logprob / T)
    equals the teacher's softmax(logits / T) renormalised over the k, exactly (the log-partition
    cancels); the student's logits at the same k entries are renormalised the same way. The
    result is KL(teacher_T,k || student_T,k): the full-vocabulary KL with the teacher's tail
    (the mass outside its top-k) left out.
    """
    student, logprobs, ids = _distill_positions(
        student_logits, labels, task, teacher_logprobs, teacher_ids
    )
    if student.numel() == 0:
        return student_logits.sum() * 0.0
    picked = student.float().gather(-1, ids.long())
    log_q = torch.log_softmax(picked / temperature, dim=-1)
    log_p = torch.log_softmax(logprobs.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def distillation_loss(
    task_loss_value: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, distill term): alpha * task + (1 - alpha) * T^2 * KL; the distill term is T^2 * KL.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-target ones
    when T changes (their magnitude shrinks as 1 / T^2).
    """
    distill = temperature**2 * kl
    return alpha * task_loss_value + (1.0 - alpha) * distill, distill


# ------------------------------------------------------------------------------ adversarial


def fgm_backward(
    embedding: torch.Tensor,
    epsilon: float,
    adversarial_loss: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
) -> torch.Tensor | None:
    """FGM, after the clean loss's backward: move the embedding weights by epsilon along their
    normalized gradient, run the loss and its backward again (gradients add up), restore the
    weights exactly (from a copy: adding and subtracting the step is not exact in floating point).

    Returns the adversarial loss, or None when the embedding gradient is zero or not finite (no
    direction to perturb along; the step then uses the clean gradient alone).
    """
    grad = embedding.grad
    if grad is None:
        raise ValueError(
            "FGM needs the input-embedding gradient, but the embedding weights got none "
            "(are they frozen?); train.adversarial needs trainable input embeddings"
        )
    norm = torch.linalg.vector_norm(grad.float())
    if not torch.isfinite(norm) or norm == 0:
        return None
    saved = embedding.detach().clone()
    with torch.no_grad():
        embedding.add_((epsilon / norm) * grad.to(embedding.dtype))
    try:
        loss = adversarial_loss()
        backward(loss)
    finally:
        with torch.no_grad():
            embedding.copy_(saved)
    return loss

"""Training objectives: what loss a batch gives, and how many tokens it carried."""

from __future__ import annotations

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the model's forward takes (labels are handled by the objective)."""
    inputs: dict = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "position_ids" in inputs:
        # Packed batches: transformers keeps packed examples apart only without a KV cache.
        inputs["use_cache"] = False
    return inputs


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a batch."""
    # Packed batches carry no attention_mask (see launcher.data.collate); num_tokens always exists.
    if "num_tokens" in batch:
        return int(batch["num_tokens"].sum().item())
    return int(batch["attention_mask"].sum().item())


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy: next-token over labelled positions (causal LM), or per sequence."""
    if task == "causal_lm":
        shift_logits = logits[:, :-1, :].contiguous()
        shift_labels = labels[:, 1:].contiguous()
        return torch.nn.functional.cross_entropy(
            shift_logits.view(-1, shift_logits.size(-1)).float(),
            shift_labels.view(-1),
            ignore_index=-100,
        )
    return torch.nn.functional.cross_entropy(logits.float(), labels.view(-1))


def align_logits(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Drop logits of virtual tokens that prompt/prefix methods prepend to the sequence."""
    if task == "causal_lm" and logits.size(1) > labels.size(1):
        return logits[:, -labels.size(1) :, :]
    return logits


def compute_loss(model, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, int]:
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
            ignore_index=-100,
            reduction="sum",
        )
        count = (shift_labels != -100).sum()
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

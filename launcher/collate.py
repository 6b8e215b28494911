"""Batch collation: tokenized rows (numpy arrays from Ray Data) -> padded tensors for the model.

One batch layout for every consumer: the training loop (through `make_collate`), the offline
distillation teacher pass and the objectives (`model_inputs`). Offline distillation rows also
carry the teacher's stored top-k (`teacher_logprobs`, `teacher_ids`), padded here like the tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100
"""Label of a position that is not learned (prompt tokens, padding): cross-entropy skips it."""

# Model inputs in a collated batch; the other keys (row_id, num_tokens, source) are bookkeeping.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def pad_sequences(values: Any, pad: int, side: str = "right") -> Any:
    """Variable-length integer sequences (object array or 2-D array) -> padded int64 tensor,
    padded on the right (training, scoring) or on the left (generation)."""
    import torch

    rows = [np.asarray(v, dtype=np.int64).reshape(-1) for v in values]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        if side == "left":
            out[i, width - len(r) :] = r
        else:
            out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, Any]:
    """Pad one batch: input_ids with pad_token_id, attention_mask with 0, labels with -100,
    position_ids with 0; classification labels and bookkeeping columns become 1-D tensors.

    Packed batches (with position_ids) carry no attention_mask: padding sits after every real
    token, so the causal mask already hides it, and without a 2-D mask transformers derives
    per-example attention from position_ids (create_causal_mask's packed-sequence detection).
    """
    import torch

    out: dict[str, Any] = {"input_ids": pad_sequences(batch["input_ids"], pad_token_id)}
    packed = "position_ids" in batch
    if "attention_mask" in batch and not packed:
        out["attention_mask"] = pad_sequences(batch["attention_mask"], 0)
    if packed:
        out["position_ids"] = pad_sequences(batch["position_ids"], 0)
    if "labels" in batch:
        labels = batch["labels"]
        if labels.dtype != object and labels.ndim == 1:
            out["labels"] = torch.from_numpy(np.array(labels, dtype=np.int64))
        else:
            out["labels"] = pad_sequences(labels, IGNORE_INDEX)
    for key in ("num_tokens", "row_id", "source_id"):
        if key in batch:
            out[key] = torch.from_numpy(np.array(batch[key], dtype=np.int64))
    if "teacher_logprobs" in batch:  # offline distillation: the stored teacher top-k
        out.update(teacher_columns(batch))
    return out


def teacher_columns(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Offline distillation columns of a batch, padded: [B, L, k] (causal LM) or [B, k]."""
    import torch

    ids = pad_sequences(batch["teacher_ids"], 0)
    rows = [np.asarray(v, dtype=np.float32).reshape(-1) for v in batch["teacher_logprobs"]]
    logprobs = np.zeros(tuple(ids.shape), dtype=np.float32)
    for i, r in enumerate(rows):
        logprobs[i, : len(r)] = r
    out = {"teacher_ids": ids, "teacher_logprobs": torch.from_numpy(logprobs)}
    labels = batch["labels"]
    if labels.dtype == object or labels.ndim > 1:  # causal LM: one top-k per token
        width = max(len(v) for v in batch["input_ids"])
        out = {k: v.reshape(v.shape[0], width, -1) for k, v in out.items()}
    return out


def make_collate(pad_token_id: int) -> Any:
    """A collate_fn for `iter_torch_batches(collate_fn=...)` that pads each batch to its longest
    row. Returns only tensors, so Ray moves the batch to the training device."""
    if pad_token_id is None:
        raise ValueError("make_collate needs a pad token id (tokenizer.pad_token_id is None)")
    from ray.data.collate_fn import NumpyBatchCollateFn

    # Ray 2.47+ wants a NumpyBatchCollateFn instance (plain functions are deprecated) to hand
    # the batch over as a dict of numpy arrays.
    class PadCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return collate(batch, pad_token_id)

    return PadCollate()


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the model's forward for a collated batch (labels excluded).

    Packed batches also get use_cache=False: transformers derives per-example attention from
    position_ids only when there is no attention_mask and no KV cache (a causal LM builds an
    empty cache whenever use_cache is on, which is the default even in training).
    """
    inputs: dict[str, Any] = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "position_ids" in inputs:
        inputs["use_cache"] = False
    return inputs

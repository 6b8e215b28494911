"""Batch scoring at scale on CPU: one output row per input row, and flat driver memory."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from launcher import batch

PAYLOAD = 8000  # characters per row carried through untouched, so rows weigh something


def private_memory() -> int:
    """Anonymous resident memory of this process (excludes Ray's shared-memory object store)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakMemory:
    """Highest private memory seen while the block runs, above what it was at the start."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = private_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, private_memory())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def write_rows(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            row = {"text": f"the fox number {i} walked to the mill", "payload": "x" * PAYLOAD}
            handle.write(json.dumps(row) + "\n")
    return path


def score_rows(model: Path, n: int, tmp_path: Path) -> tuple[Path, PeakMemory]:
    src = write_rows(tmp_path / f"rows-{n}.jsonl", n)
    with PeakMemory() as memory:
        out = batch.score(
            model,
            src,
            tmp_path / f"scores-{n}.parquet",
            pool=batch.PoolOptions(batch_size=64, progress=False),
        )
    return out, memory


@pytest.mark.slow
def test_ten_thousand_rows_one_to_one_with_flat_memory(
    ray_session, tiny_gpt2, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("FTLAUNCH_IN_PROCESS", "0")  # every size on the actor pool
    score_rows(tiny_gpt2, 200, tmp_path)  # warm-up: first-use imports and Ray Data set-up
    _, small = score_rows(tiny_gpt2, 2_000, tmp_path)
    out, large = score_rows(tiny_gpt2, 10_000, tmp_path)

    table = pq.read_table(out, columns=["row_id", "text", "num_tokens", "log_likelihood"])
    assert table.num_rows == 10_000
    ids = table["row_id"].to_pylist()
    assert sorted(ids) == list(range(10_000))
    texts = table["text"].to_pylist()
    assert all(
        text == f"the fox number {i} walked to the mill" for i, text in zip(ids, texts, strict=True)
    )
    assert min(table["num_tokens"].to_pylist()) > 0
    assert all(ll < 0 for ll in table["log_likelihood"].to_pylist())
    assert pq.read_schema(out).names[:3] == ["text", "payload", "row_id"]

    # 8,000 more rows carry 64 MB more payload; driver memory must not follow the row count.
    extra_data_mb = 8_000 * PAYLOAD / 2**20
    assert large.growth_mb < small.growth_mb + 24, (small.growth_mb, large.growth_mb)
    assert large.growth_mb < 0.75 * extra_data_mb

    # Nothing from Ray's C++ core on the terminal (it wrote to this process's stderr about the
    # pool actors' constructor arguments while Ray Data could restart them).
    err = capfd.readouterr().err
    assert "core_worker.cc" not in err and "constructor arguments" not in err, err[-2000:]

"""Data pipeline: SST-2 through ftlaunch's prepare_data vs one-process `datasets.map`.

Each measurement runs in a fresh child process (`python -m bench.data_pipeline IMPL FILE`) so
its peak memory is its own: the child samples the PSS of itself and every descendant (Ray's
GCS, raylet and data workers included) and prints one JSON line. Reported memory is the peak
minus the footprint just before the pipeline started (Ray and the tokenizer already loaded).

Three implementations, all tokenizing `text` (truncated to 64 tokens) and mapping labels to ids:
  ftlaunch  launcher.data.prepare_data: read + validate in the driver, Ray Data map_batches,
            materialize() (the tokenized splits stay in the object store for training)
  stream    the same tokenizer function over ray.data.read_json -> map_batches -> iter_batches,
            nothing materialized: the streaming path prepare_data does not take
  datasets  datasets.load_dataset("json") + Dataset.map(batched=True), one process
  cache     launcher.prepared over a directory of Parquet files, two children sharing one fresh
            cache directory: the first data stage (read + validate + tokenize + write the entry)
            and the second (fingerprint, read_parquet the entry, materialize). Its own entry
            point: `python -m bench.data_pipeline measure-cache OUT.json` (1x and 10x SST-2 as Parquet).
  streamed  the cache's first run forced onto the streamed path (launcher.stream_data,
            FTLAUNCH_STREAM_BYTES=0): the driver lists the Parquet files, Ray Data tasks read,
            validate, tokenize and write the entry. `python -m bench.data_pipeline
            measure-streamed OUT.json`: the driver's peak RSS at 1x, 10x and 100x SST-2 and the
            process tree's peak at 1x and 10x.

Every child also reports the driver's own peak RSS (getrusage), apart from the process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PeakSampler, log, median, ratio, tree_memory_bytes

MAX_LENGTH = 64
LABELS = ["negative", "positive"]


def data_recipe(path: Path, cache_dir: str | None = None):
    from launcher.recipe import Recipe

    return Recipe.model_validate(
        {
            "name": "bench-data",
            "model": {"name_or_path": "unused", "task": "classification", "labels": LABELS},
            "data": {
                "train": str(path),
                "format": "classification",
                "split": {"validation": 0.0},
                "max_length": MAX_LENGTH,
                "cache_dir": cache_dir,
            },
        }
    )


def run_ftlaunch(path: Path, tokenizer) -> int:
    from launcher.data import prepare_data

    data = prepare_data(data_recipe(path), tokenizer)
    return data.num_rows["train"]


def run_stream(path: Path, tokenizer) -> int:
    import pyarrow as pa
    import ray

    def tokenize(batch: pa.Table) -> pa.Table:
        ids = tokenizer(batch.column("text").to_pylist(), truncation=True, max_length=MAX_LENGTH)[
            "input_ids"
        ]
        labels = [LABELS.index(x) for x in batch.column("label").to_pylist()]
        return pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": labels})

    ds = ray.data.read_json(str(path)).map_batches(tokenize, batch_format="pyarrow", batch_size=256)
    rows = 0
    for batch in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        rows += batch.num_rows
    return rows


def run_datasets(path: Path, tokenizer) -> int:
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as cache:
        if path.is_dir():  # the streamed measurements' Parquet files
            files = [str(f) for f in sorted(path.glob("*.parquet"))]
            ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        else:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch["text"], truncation=True, max_length=MAX_LENGTH)
            return {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": [LABELS.index(x) for x in batch["label"]],
            }

        out = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=ds.column_names)
        return out.num_rows


def run_cached(path: Path, tokenizer) -> dict[str, Any]:
    """One data stage through the prepared-dataset cache in $BENCH_CACHE_DIR (a miss writes the
    entry, a hit reads it)."""
    from launcher import prepared
    from launcher.data import load_tables

    recipe = data_recipe(path, cache_dir=os.environ["BENCH_CACHE_DIR"])
    slot = prepared.lookup(recipe, tokenizer)
    tables = None if slot.hit or prepared.streams(slot) else load_tables(recipe)
    data = prepared.load_or_prepare(slot, recipe, tokenizer, tables=tables)
    return {
        "rows": data.num_rows["train"],
        "hit": slot.hit,
        "entry_mb": prepared.entry_size(slot.path) / 2**20,
    }


IMPLEMENTATIONS = {"ftlaunch": run_ftlaunch, "stream": run_stream, "datasets": run_datasets}
CHILD_ONLY = {"cache": run_cached}


def child(impl: str, path: Path, model_dir: Path) -> dict[str, Any]:
    """Runs in the child process: one pipeline, timed and memory-sampled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Imports are the process's start-up, not the data stage: each side's before the clock.
    if impl == "datasets":
        import datasets  # noqa: F401
    else:
        import launcher.data
        import launcher.prepared
        import launcher.recipe  # noqa: F401
    if impl != "datasets":
        from launcher.raysession import ensure_ray, quiet_ray_data

        ensure_ray()
        quiet_ray_data(False)
        time.sleep(2)  # let Ray's own processes settle before the baseline footprint
    before = tree_memory_bytes()
    driver_before = driver_rss_bytes()
    with PeakSampler() as sampler:
        started = time.perf_counter()
        out = {**IMPLEMENTATIONS, **CHILD_ONLY}[impl](path, tokenizer)
        seconds = time.perf_counter() - started
    extra = out if isinstance(out, dict) else {"rows": out}
    return {
        **extra,
        "impl": impl,
        "seconds": seconds,
        "rows_per_s": extra["rows"] / seconds,
        "driver_rss_before_mb": driver_before / 2**20,
        "driver_peak_mb": driver_peak_bytes() / 2**20,
        "footprint_before_mb": before / 2**20,
        "peak_mb": sampler.peak / 2**20,
        "peak_growth_mb": (sampler.peak - before) / 2**20,
        "samples": sampler.samples,
    }


def driver_rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def driver_peak_bytes() -> int:
    """This process's peak resident memory since it started (the driver alone, no Ray workers)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def spawn(
    impl: str, path: Path, model_dir: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "bench.data_pipeline", impl, str(path), str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"data pipeline child {impl} failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def repeated_file(source: Path, times: int, out: Path) -> Path:
    """`source` written `times` times over (the 10x data set)."""
    text = source.read_text(encoding="utf-8")
    with out.open("w", encoding="utf-8") as sink:
        for _ in range(times):
            sink.write(text)
    return out


def measure_data(
    source: Path, model_dir: Path, repeats: int, multiplier: int, work: Path
) -> dict[str, Any]:
    """Rows/s at 1x (median of repeats) and peak memory growth at 1x and `multiplier`x."""
    work.mkdir(parents=True, exist_ok=True)
    big = repeated_file(source, multiplier, work / f"sst2-x{multiplier}.jsonl")
    runs: dict[str, dict[str, list]] = {}
    for impl in IMPLEMENTATIONS:
        runs[impl] = {"1x": [], f"{multiplier}x": []}
        for i in range(repeats):
            log(f"data pipeline: {impl} 1x ({i + 1}/{repeats})")
            runs[impl]["1x"].append(spawn(impl, source, model_dir))
        log(f"data pipeline: {impl} {multiplier}x")
        runs[impl][f"{multiplier}x"].append(spawn(impl, big, model_dir))
    big.unlink()

    def stat(impl: str, scale: str, key: str) -> float | None:
        return median(r[key] for r in runs[impl][scale])

    summary = {
        impl: {
            "rows_per_s": stat(impl, "1x", "rows_per_s"),
            "peak_growth_mb_1x": stat(impl, "1x", "peak_growth_mb"),
            f"peak_growth_mb_{multiplier}x": stat(impl, f"{multiplier}x", "peak_growth_mb"),
            "memory_growth_factor": ratio(
                stat(impl, f"{multiplier}x", "peak_growth_mb"),
                stat(impl, "1x", "peak_growth_mb"),
            ),
        }
        for impl in IMPLEMENTATIONS
    }
    return {
        "rows_1x": runs["datasets"]["1x"][0]["rows"],
        "multiplier": multiplier,
        "summary": summary,
        "rows_per_s_ratio": ratio(
            summary["ftlaunch"]["rows_per_s"], summary["datasets"]["rows_per_s"]
        ),
        "peak_memory_ratio_1x": ratio(
            summary["ftlaunch"]["peak_growth_mb_1x"], summary["datasets"]["peak_growth_mb_1x"]
        ),
        "runs": runs,
    }


def repeated_parquet(source: Path, times: int, out: Path) -> Path:
    """`source` (JSON Lines) written as `times` identical Parquet files in the directory `out`."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    table = pajson.read_json(source)
    for i in range(times):
        pq.write_table(table, out / f"part-{i:03d}.parquet")
    return out


def measure_cache(source: Path, model_dir: Path, multiplier: int, work: Path) -> dict[str, Any]:
    """The prepared-dataset cache at 1x and `multiplier`x rows: a first run (miss) and a second
    (hit) in separate processes sharing one cache directory, so each driver peak is its own."""
    out: dict[str, Any] = {"multiplier": multiplier}
    for times in (1, multiplier):
        folder = repeated_parquet(source, times, work / f"sst2-parquet-x{times}")
        env = {"BENCH_CACHE_DIR": str(work / f"cache-x{times}")}
        log(f"data cache: {times}x, first run")
        first = spawn("cache", folder, model_dir, env)
        log(f"data cache: {times}x, second run")
        second = spawn("cache", folder, model_dir, env)
        out[f"{times}x"] = {
            "first": first,
            "second": second,
            "second_over_first": ratio(second["seconds"], first["seconds"]),
        }
    return out


def measure_streamed(
    source: Path,
    model_dir: Path,
    work: Path,
    multipliers: tuple[int, ...] = (1, 10, 100),
    out_file: Path | None = None,
) -> dict[str, Any]:
    """The streamed preparation's first run (a miss) at each multiplier, each in its own child:
    the driver's peak RSS must not grow with the data; the tree's peak (Ray's workers and
    object store included) may grow a little with the number of tasks in flight. With
    out_file, the results so far are written after each multiplier (a slow machine may not
    get through 100x).

    Up to BASELINE_MAX_TIMES, one-process `datasets.map` tokenizes the same Parquet files in
    the same run (each side one tokenizer thread): rows/s as a ratio."""
    runs: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    result: dict[str, Any] = {}
    for times in multipliers:
        folder = repeated_parquet(source, times, work / f"sst2-parquet-x{times}")
        env = {"BENCH_CACHE_DIR": str(work / f"cache-x{times}"), "FTLAUNCH_STREAM_BYTES": "0"}
        log(f"data streamed: {times}x")
        runs[f"{times}x"] = spawn("cache", folder, model_dir, env)
        if times <= BASELINE_MAX_TIMES:
            log(f"data streamed: {times}x, datasets.map on the same files")
            baseline[f"{times}x"] = spawn("datasets", folder, model_dir)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work / f"cache-x{times}", ignore_errors=True)
        result = _streamed_summary(runs, baseline)
        if out_file is not None:
            out_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


BASELINE_MAX_TIMES = 10  # datasets.map at 100x would add about ten minutes


def _streamed_summary(runs: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    multipliers = [int(k.removesuffix("x")) for k in runs]
    first, last = f"{multipliers[0]}x", f"{multipliers[-1]}x"
    tree = f"{multipliers[1]}x" if len(multipliers) > 1 else first
    return {
        "multipliers": multipliers,
        "driver_peak_mb": {k: r["driver_peak_mb"] for k, r in runs.items()},
        "driver_growth_mb": {
            k: r["driver_peak_mb"] - r["driver_rss_before_mb"] for k, r in runs.items()
        },
        "driver_peak_ratio": ratio(runs[last]["driver_peak_mb"], runs[first]["driver_peak_mb"]),
        "tree_peak_mb": {k: r["peak_mb"] for k, r in runs.items()},
        "tree_peak_ratio": ratio(runs[tree]["peak_mb"], runs[first]["peak_mb"]),
        "rows_per_s": {k: r["rows_per_s"] for k, r in runs.items()},
        "datasets_map_rows_per_s": {k: r["rows_per_s"] for k, r in baseline.items()},
        "rows_per_s_ratio": {
            k: ratio(runs[k]["rows_per_s"], r["rows_per_s"]) for k, r in baseline.items()
        },
        "runs": runs,
        "datasets_map_runs": baseline,
    }


def main_streamed(out_file: Path, multipliers: tuple[int, ...] = (1, 10, 100)) -> None:
    """`python -m bench.data_pipeline measure-streamed OUT.json [M ...]`: measure_streamed on
    SST-2 with a tiny GPT-2 tokenizer built on the fly."""
    from bench.common import SST2_TRAIN
    from launcher.dev.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-stream-") as work:
        model = build_tiny_model(Path(work) / "tiny-gpt2", "gpt2")
        result = measure_streamed(SST2_TRAIN, model, Path(work), multipliers, out_file)
    print(json.dumps(result, indent=2))


def main_cache(out_file: Path, multiplier: int = 10) -> None:
    """`python -m bench.data_pipeline measure-cache OUT.json [MULTIPLIER]`: measure_cache on SST-2 with
    a tiny GPT-2 tokenizer built on the fly."""
    from bench.common import SST2_TRAIN
    from launcher.dev.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as work:
        model = build_tiny_model(Path(work) / "tiny-gpt2", "gpt2")
        result = measure_cache(SST2_TRAIN, model, multiplier, Path(work))
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__" and sys.argv[1:2] == ["measure-cache"]:
    main_cache(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 10)
elif __name__ == "__main__" and sys.argv[1:2] == ["measure-streamed"]:
    main_streamed(Path(sys.argv[2]), tuple(int(m) for m in sys.argv[3:]) or (1, 10, 100))
elif __name__ == "__main__":
    impl_name, file_name, model_name = sys.argv[1:4]
    result = child(impl_name, Path(file_name), Path(model_name))
    print(json.dumps(result), flush=True)

"""The markdown table of a benchmark result (printed, and written to bench/results/latest.md)."""

from __future__ import annotations

from typing import Any

from bench.common import ratio


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _mb(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MB"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _accelerator(meta: dict[str, Any]) -> str:
    accel = meta.get("accelerator") or {}
    return f" ({accel['name']})" if accel.get("device") == "cuda" else ""


def markdown(result: dict[str, Any]) -> str:
    """Every figure of `result` as tables; sections that failed show their error."""
    meta = result["machine"]
    lines = [
        f"# ftlaunch benchmarks: {result['date']} on {result['host']}",
        "",
        f"Mode: {result['mode']}. {meta['cpus']} CPUs, {meta.get('gpus', 0)} GPUs"
        f"{_accelerator(meta)}, "
        f"torch {meta['torch']}, ray {meta['ray']}, transformers {meta['transformers']}. "
        f"Load average at start / end: {meta['load_start']} / {meta.get('load_end', 'n/a')} "
        f"(a shared machine: absolute numbers are noisy, ratios are measured in the same run). "
        f"Total {result.get('seconds', 0):.0f} s.",
        "",
        "## Ratios (ftlaunch / plain-library baseline, median of repeats)",
        "",
        _row("#", "measurement", "ftlaunch", "baseline", "ratio"),
        _row("---", "---", "---:", "---:", "---:"),
    ]
    s = result["sections"]
    for key, label in (("train_tiny", "GPT-2"), ("train_smollm2", "SmolLM2-135M LoRA")):
        t = s.get(key, {})
        shape = t.get("spec", {}).get("label", label) if key == "train_tiny" else label
        lines.append(
            _row(
                1,
                f"training tokens/s, steady state, {shape}",
                _num(t.get("ftlaunch_tokens_per_s")),
                _num(t.get("plain_tokens_per_s")),
                _num(t.get("ratio")),
            )
        )
        if t.get("ftlaunch_mfu") is not None:
            lines.append(
                _row(
                    1,
                    f"MFU, {shape} (peak {_num(t.get('peak_tflops_per_gpu'))} TFLOP/s per GPU)",
                    _num(t.get("ftlaunch_mfu")),
                    _num(t.get("plain_mfu")),
                    _num(ratio(t.get("ftlaunch_mfu"), t.get("plain_mfu"))),
                )
            )
    t = s.get("train_classification")
    if t is not None:
        lines.append(
            _row(
                1,
                f"training samples/s, steady state, {t.get('spec', {}).get('label', 'MiniLM')}",
                _num(t.get("ftlaunch_samples_per_s")),
                _num(t.get("plain_samples_per_s")),
                _num(t.get("ratio")),
            )
        )
    t = s.get("time_to_first_step", {})
    lines.append(
        _row(
            2,
            "time to first step, s (incl. Ray start; lower is better)",
            _num(t.get("ftlaunch_s")),
            _num(t.get("plain_s")),
            _num(t.get("ratio")),
        )
    )
    d = s.get("data", {})
    summ = d.get("summary", {})
    mult = d.get("multiplier", 10)
    lines.append(
        _row(
            3,
            f"data: SST-2 rows/s ({_num(d.get('rows_1x'))} rows), prepare_data vs datasets.map",
            _num(summ.get("ftlaunch", {}).get("rows_per_s")),
            _num(summ.get("datasets", {}).get("rows_per_s")),
            _num(d.get("rows_per_s_ratio")),
        )
    )
    lines.append(
        _row(
            3,
            "data: peak memory growth at 1x, MB (lower is better)",
            _num(summ.get("ftlaunch", {}).get("peak_growth_mb_1x")),
            _num(summ.get("datasets", {}).get("peak_growth_mb_1x")),
            _num(d.get("peak_memory_ratio_1x")),
        )
    )
    m = s.get("memory", {}).get("strategies", {})
    for name, v in m.items():
        lines.append(
            _row(
                4,
                f"memory per rank, {name}, 2 ranks (params+grads+optimizer; baseline = theory)",
                _mb(v.get("measured_max_rank_bytes")),
                _mb(v.get("theory_bytes", {}).get("total")),
                _num(v.get("ratio_to_theory")),
            )
        )
    c = s.get("scoring", {})
    lines.append(
        _row(
            5,
            f"batch scoring rows/s ({_num(c.get('rows'))} rows, "
            f"{s.get('train_tiny', {}).get('spec', {}).get('label', 'GPT-2')})",
            _num(c.get("ftlaunch_rows_per_s")),
            _num(c.get("plain_rows_per_s")),
            _num(c.get("ratio")),
        )
    )
    g = s.get("scaling", {})
    lines.append(
        _row(
            6,
            "scaling tokens/s, 2 workers vs 1 (1 CPU or GPU each); ratio = efficiency (speedup / 2)"
            + (f" ({g['skipped']})" if g.get("skipped") else ""),
            _num(g.get("two_workers_tokens_per_s")),
            _num(g.get("one_worker_tokens_per_s")),
            _num(g.get("efficiency")),
        )
    )
    lines += _ttfs_table(t) + _data_table(d, mult) + _memory_table(m) + _errors(s)
    return "\n".join(lines) + "\n"


def _ttfs_table(t: dict[str, Any]) -> list[str]:
    b = t.get("breakdown_s")
    if not b:
        return []
    return [
        "",
        f"## Time to first step: where the fixed overhead goes "
        f"({_num(t.get('fixed_overhead_s'))} s more than the plain loop)",
        "",
        _row("phase (ftlaunch)", "seconds"),
        _row("---", "---:"),
        _row("Ray start + tokenizer load", _num(b.get("ray_start_and_tokenizer"))),
        _row("data: read, validate, tokenize in Ray Data, materialize", _num(b.get("data_prep"))),
        _row("run directory and step plan", _num(b.get("run_dir_and_plan"))),
        _row("Ray Train worker start (estimated)", _num(b.get("worker_start_estimated"))),
        _row("model build in the worker (estimated)", _num(b.get("model_build_estimated"))),
        _row(
            "strategy wrap, shard iterator, first step, first report",
            _num(b.get("first_step_and_report")),
        ),
        _row("plain loop: tokenizer + data", _num(b.get("plain_data"))),
        _row("plain loop: model + optimizer", _num(b.get("plain_model_build"))),
        _row("plain loop: first step", _num(b.get("plain_first_step"))),
    ]


def _data_table(d: dict[str, Any], mult: int) -> list[str]:
    summ = d.get("summary")
    if not summ:
        return []
    lines = [
        "",
        f"## Data pipeline: memory at 1x and {mult}x rows",
        "",
        _row("pipeline", "rows/s (1x)", "peak growth 1x, MB", f"peak growth {mult}x, MB", "growth"),
        _row("---", "---:", "---:", "---:", "---:"),
    ]
    names = {
        "ftlaunch": "ftlaunch prepare_data (materialized)",
        "stream": "Ray Data streaming, not materialized",
        "datasets": "datasets.map, one process",
    }
    for impl, v in summ.items():
        lines.append(
            _row(
                names.get(impl, impl),
                _num(v.get("rows_per_s")),
                _num(v.get("peak_growth_mb_1x")),
                _num(v.get(f"peak_growth_mb_{mult}x")),
                _num(v.get("memory_growth_factor")) + "x",
            )
        )
    return lines


def _memory_table(m: dict[str, Any]) -> list[str]:
    if not m:
        return []
    lines = [
        "",
        "## Memory per rank (2 gloo ranks, fp32, AdamW), measured vs ZeRO theory",
        "",
        _row(
            "strategy",
            "params+optimizer",
            "theory",
            "grads",
            "theory",
            "total / theory",
            "total / ddp",
        ),
        _row("---", "---:", "---:", "---:", "---:", "---:", "---:"),
    ]
    for name, v in m.items():
        theory = v["theory_bytes"]
        rank = max(v["ranks"], key=lambda r: r["total_bytes"])
        lines.append(
            _row(
                name,
                _mb(rank["params_plus_optimizer_bytes"]),
                _mb(theory["params"] + theory["optimizer"]),
                _mb(rank["grad_bytes"]),
                _mb(theory["grads"]),
                _num(v.get("ratio_to_theory")),
                _num(v.get("fraction_of_ddp")),
            )
        )
    return lines


def _errors(sections: dict[str, Any]) -> list[str]:
    failed = [(k, v["error"]) for k, v in sections.items() if isinstance(v, dict) and "error" in v]
    if not failed:
        return []
    return ["", "## Sections that failed", ""] + [f"- {k}: {e}" for k, e in failed]

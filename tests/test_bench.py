"""The benchmark harness's own logic: device detection, GPU sizes, FLOPs per token and MFU.

The benchmark itself (`make bench`) is not run here; these check the parts whose mistakes would
make its figures wrong, the FLOPs formula against torch's own FLOP counter.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import FULL, GPU, QUICK
from bench.hardware import (
    Accelerator,
    detect,
    matmul_parameters,
    mfu,
    peak_tflops,
    training_flops_per_token,
)

A100 = Accelerator("cuda", "NVIDIA A100-SXM4-80GB", 8, 312.0)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", 65.0),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_flops_come_from_the_device_name(name, peak, monkeypatch):
    monkeypatch.delenv("FTLAUNCH_PEAK_TFLOPS", raising=False)
    assert peak_tflops(name) == peak


def test_peak_flops_can_be_given_for_devices_the_table_lacks(monkeypatch):
    monkeypatch.setenv("FTLAUNCH_PEAK_TFLOPS", "500")
    assert peak_tflops("Some Future Accelerator") == 500.0


def test_this_machine_runs_the_cpu_sizes(monkeypatch):
    from bench.run import choose_sizes

    monkeypatch.delenv("FTLAUNCH_BENCH_DEVICE", raising=False)
    accel = detect()
    assert accel.device == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("FTLAUNCH_BENCH_DEVICE", "cpu")
    cpu = detect()
    assert cpu.device == "cpu" and cpu.peak_tflops is None
    assert choose_sizes(False, cpu) == (FULL, "full")
    assert choose_sizes(True, A100) == (QUICK, "quick")
    sizes, mode = choose_sizes(False, A100)
    assert mode == "gpu" and sizes is GPU
    assert sizes.train_width > FULL.train_width and sizes.tiny_length > FULL.tiny_length


def test_gpu_runs_with_a_time_limit_set_fewer_repeats_and_keep_the_gpu_shapes():
    from bench.run import choose_sizes, parse_args

    sizes, mode = choose_sizes(False, A100, repeats=1)
    assert mode == "gpu" and sizes.repeats == sizes.smol_repeats == 1
    assert (sizes.train_width, sizes.tiny_length) == (GPU.train_width, GPU.tiny_length)
    assert choose_sizes(False, A100, repeats=None)[0] is GPU
    args = parse_args(["--only", "train_tiny", "train_smollm2", "--repeats", "1"])
    assert args.repeats == 1 and args.only == ["train_tiny", "train_smollm2"]


def test_smollm2_stands_in_from_a_model_directory(monkeypatch, tmp_path):
    from bench.common import SMOLLM2, SMOLLM2_ENV, smollm2_model

    monkeypatch.delenv(SMOLLM2_ENV, raising=False)
    assert smollm2_model() == SMOLLM2
    monkeypatch.setenv(SMOLLM2_ENV, str(tmp_path))
    assert smollm2_model() == {"name_or_path": str(tmp_path)}


def _counted_and_estimated(model_dir, lora: bool, length: int = 48) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    # Eager attention: its matmuls are ones the counter sees on CPU.
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    if lora:
        from peft import LoraConfig, get_peft_model

        from bench.common import LLAMA_PROJECTIONS

        config = LoraConfig(r=4, target_modules=LLAMA_PROJECTIONS, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    ids = torch.randint(0, 500, (2, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    c = model.config
    per_token = training_flops_per_token(
        matmul_parameters(model), c.num_hidden_layers, c.hidden_size, length, frozen_base=lora
    )
    return counter.get_total_flops(), per_token * ids.numel()


@pytest.mark.parametrize(
    ("fixture", "lora"), [("tiny_gpt2", False), ("tiny_llama", False), ("tiny_llama", True)]
)
def test_flops_per_token_match_torch_flop_counter(request, fixture, lora):
    counted, estimated = _counted_and_estimated(request.getfixturevalue(fixture), lora)
    assert estimated == pytest.approx(counted, rel=0.01)


def test_mfu_is_achieved_over_peak_flops():
    flops = training_flops_per_token(124_000_000, 12, 768, 512, frozen_base=False)
    assert mfu(100_000.0, flops, A100, devices=2) == pytest.approx(100_000.0 * flops / (2 * 312e12))
    assert mfu(100_000.0, flops, Accelerator("cpu", "x86_64", 1, None), 1) is None


def test_plain_loop_reports_the_model_shape_and_the_table_shows_mfu(tiny_gpt2, tmp_path):
    """The plain side of the throughput measurement, for real on this CPU, then the MFU that
    the GPU mode derives from its shape and the row the table gets."""
    from bench.common import exact_length_texts, write_text_rows
    from bench.report import markdown
    from bench.train import TrainSpec, add_mfu, load_plain_tokenizer, run_plain

    model = {"name_or_path": str(tiny_gpt2)}
    texts = exact_length_texts(load_plain_tokenizer(model), 40, 32)
    spec = TrainSpec(
        label="gpt2-2x64",
        model=model,
        data=write_text_rows(tmp_path / "rows.jsonl", texts),
        steps=6,
        warmup=2,
        log_every=2,
        batch_size=4,
        length=32,
        cpus_per_worker=1,
    )
    plain = run_plain(spec)
    assert plain["tokens"] == 4 * 4 * 32 and plain["tokens_per_s"] > 0
    assert plain["model_shape"]["layers"] == 2 and plain["model_shape"]["hidden"] == 64

    out = {"ftlaunch_tokens_per_s": 900.0, "plain_tokens_per_s": 1000.0, "plain_runs": [plain]}
    add_mfu(out, spec, A100)
    flops = training_flops_per_token(plain["model_shape"]["params"], 2, 64, 32, frozen_base=False)
    assert out["ftlaunch_mfu"] == pytest.approx(900.0 * flops / 312e12)
    assert out["ftlaunch_mfu"] / out["plain_mfu"] == pytest.approx(0.9)
    result = {
        "date": "d",
        "host": "h",
        "mode": "gpu",
        "machine": {"cpus": 2, "gpus": 8, "torch": "t", "ray": "r", "transformers": "x"}
        | {"load_start": 0.0, "accelerator": A100.describe()},
        "sections": {"train_tiny": {**out, "spec": {"label": spec.label}, "ratio": 0.9}},
    }
    table = markdown(result)
    assert "(NVIDIA A100-SXM4-80GB)" in table
    assert "| 1 | MFU, gpt2-2x64 (peak 312 TFLOP/s per GPU) |" in table


def test_chat_tokenize_row_compares_the_same_labels_on_both_sides():
    """The chat tokenization row on a few rows with a tiny tokenizer and SmolLM2's way of
    writing ChatML: ftlaunch (prefix rendering and markers) and datasets.map with the
    assistant mask give the same labels, so the ratio compares equal work."""
    from bench.chat_tokenize import EVERY_TURN, measure_chat_tokenize
    from launcher.dev.synthetic import story_lines
    from launcher.dev.tiny import train_tokenizer

    tokenizer = train_tokenizer("gpt2", story_lines(100, seed=1), 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for message in messages %}" + EVERY_TURN + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    result = measure_chat_tokenize(tokenizer, rows=6, repeats=1)
    assert result["labels_match_datasets_mask"] == {
        "ftlaunch_prefix": True,
        "ftlaunch_markers": True,
    }
    assert result["rows_per_s_ratio_prefix"] > 0 and result["rows_per_s_ratio_markers"] > 0
    assert result["summary"]["ftlaunch_prefix"]["check_seconds"] > 0


def test_checkpoint_upload_stall_is_the_extra_time_after_each_checkpoint():
    from bench.checkpoint_upload import CHECKPOINT_EVERY, STEPS, side_figures

    times = {step: 1.0 for step in range(1, STEPS + 1)}
    for checkpoint in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY):
        times[checkpoint + 1] = 4.0  # the checkpoint itself
        times[checkpoint + 2] = 1.5  # a step slowed by an upload still going
    figures = side_figures(times)
    assert figures == {"steady_s": 1.0, "after_checkpoint_s": 4.0, "stall_s": 3.5}


def _classification_spec(model_dir, data, **changes):
    from bench.train import TrainSpec

    fields = {
        "label": "bert-cls",
        "model": {"name_or_path": str(model_dir)},
        "data": data,
        "steps": 4,
        "warmup": 1,
        "log_every": 2,
        "batch_size": 4,
        "length": 8,
        "cpus_per_worker": 2,
        "task": "classification",
        "labels": ("ham", "spam"),
    }
    return TrainSpec(**(fields | changes))


def test_classification_recipe_names_the_task_labels_and_format(tmp_path):
    from bench.train import recipe_body
    from launcher.recipe import Recipe

    spec = _classification_spec("/models/bert", tmp_path / "rows.jsonl")
    body = recipe_body(spec, tmp_path / "runs")
    assert body["model"]["task"] == "classification"
    assert body["model"]["labels"] == ["ham", "spam"]
    assert body["data"]["format"] == "classification" and body["data"]["max_length"] == 8
    assert body["scaling"]["cpus_per_worker"] == 2
    assert spec.unit == "samples_per_s"
    Recipe.model_validate(body)


def test_steady_state_counts_samples_of_the_windows_after_warmup():
    from bench.train import steady_state

    metrics = [
        {"step": 2, "tokens": 100.0, "tokens_per_s": 10.0, "samples_per_s": 1.0},
        {"step": 4, "tokens": 200.0, "tokens_per_s": 100.0, "samples_per_s": 8.0},
        {"step": 6, "tokens": 300.0, "tokens_per_s": 100.0, "samples_per_s": 8.0},
    ]
    out = steady_state(metrics, warmup=2)
    assert out["seconds"] == pytest.approx(5.0) and out["samples"] == pytest.approx(40.0)
    assert out["samples_per_s"] == pytest.approx(8.0) and out["tokens_per_s"] == 100.0


def test_long_enough_rows_keep_texts_that_fill_the_length(tiny_bert, tmp_path):
    from bench.common import long_enough_rows, write_rows
    from bench.train import load_plain_tokenizer

    tokenizer = load_plain_tokenizer({"name_or_path": str(tiny_bert)})
    rows = [{"text": "good " * n, "label": "ham"} for n in (1, 2, 3, 6, 20)]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    kept = long_enough_rows(tokenizer, path, 8)
    sizes = {r["text"]: len(tokenizer(r["text"])["input_ids"]) for r in rows}
    assert kept and len(kept) < len(rows)
    assert kept == [r for r in rows if sizes[r["text"]] >= 8]  # in file order


def test_plain_classification_loop_trains_exact_length_rows(tiny_bert, tmp_path):
    """The plain side of the classification row: truncated rows of exactly `length` tokens,
    label ids in the spec's order, a classification head, samples/s."""
    from bench.common import write_rows
    from bench.train import load_plain_tokenizer, plain_examples, run_plain

    words = ["good", "movie", "bad", "film", "great", "plot", "awful", "acting"]
    rows = [
        {"text": " ".join(words[i % 8 :] + words) + " extra", "label": ("ham", "spam")[i % 2]}
        for i in range(24)
    ] + [{"text": "short", "label": "ham"}]
    spec = _classification_spec(tiny_bert, write_rows(tmp_path / "rows.jsonl", rows))
    ids, targets = plain_examples(spec, load_plain_tokenizer(spec.model))
    assert tuple(ids.shape) == (24, 8)  # the short row is left out, the rest truncated
    assert targets.tolist() == [i % 2 for i in range(24)]
    plain = run_plain(spec)
    assert plain["samples"] == 3 * 4 and plain["tokens"] == 3 * 4 * 8
    assert plain["samples_per_s"] > 0 and plain["final_loss"] > 0


def test_throughput_ratio_is_the_median_of_paired_ratios(monkeypatch, tmp_path):
    from bench import train

    spec = _classification_spec("/models/bert", tmp_path / "rows.jsonl", workers=1)
    ours = iter([{"samples_per_s": v} for v in (9.0, 4.0, 10.0)])
    theirs = iter([{"samples_per_s": v} for v in (10.0, 5.0, 20.0)])
    monkeypatch.setattr(train, "run_ftlaunch", lambda spec, storage: next(ours))
    monkeypatch.setattr(train, "run_plain", lambda spec: next(theirs))
    out = train.measure_throughput(spec, 3, tmp_path)
    assert out["unit"] == "samples_per_s"
    assert out["ftlaunch_samples_per_s"] == 9.0 and out["plain_samples_per_s"] == 10.0
    assert out["ratio"] == pytest.approx(0.8) and out["ratio_of_medians"] == pytest.approx(0.9)


def test_a_run_of_some_sections_keeps_latest_md(tmp_path):
    from bench.run import write_results

    result = {
        "date": "d",
        "host": "h",
        "mode": "full",
        "machine": {"cpus": 2, "torch": "t", "ray": "r", "transformers": "x", "load_start": 0.0},
        "sections": {
            "train_classification": {
                "spec": {"label": "minilm-sms-spam"},
                "ftlaunch_samples_per_s": 15.0,
                "plain_samples_per_s": 16.0,
                "ratio": 0.94,
            }
        },
    }
    json_path, md_path = write_results(result, tmp_path, full=False)
    assert md_path.name == json_path.name.replace(".json", ".md")
    assert not (tmp_path / "latest.md").exists()
    assert "| 1 | training samples/s, steady state, minilm-sms-spam | 15" in md_path.read_text()
    assert write_results(result, tmp_path)[1].name == "latest.md"

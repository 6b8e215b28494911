"""QLoRA: LoRA on a base loaded in 4 bits (bitsandbytes NF4), on the CPU.

The schema's acceptance and refusals, then one in-process job on the tiny Llama (Ray Train local
mode, one ddp worker): the trained model has 4-bit layers and only LoRA weights train, the loss
falls, a stopped run resumes to the same adapter, and the export's adapter reloads with peft.
Then the sharding strategies: fsdp (one rank in-process, two spawned ranks, a one-worker job)
and deepspeed ZeRO-3 (two spawned ranks resumed by one, a one-worker job in its own process).

Which outputs are compared exactly, and why: the adapter on a freshly 4-bit-loaded base against
the model as it trained (quantization is deterministic, so both run the same dequantized weights
and the same LoRA weights), and the adapter on the unquantized base against the merged export
(both run the full-precision base; they differ only by the rounding of the merge). The merged
export against the model as it trained differs by the 4-bit quantization error of the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import job_body, join_gloo_group, write_recipe

from launcher.cli import cli
from launcher.recipe import RecipeError, load_recipe, validate_data

pytest.importorskip("bitsandbytes")

MINIMAL = {"name": "q", "model": {"name_or_path": "some/model"}, "data": {"train": "t.jsonl"}}


def qlora_recipe(**sections):
    return validate_data({**MINIMAL, "finetune": {"method": "qlora"}, **sections})


def refusal(tmp_path: Path, **sections) -> str:
    """The output of `ftlaunch validate` on a qlora recipe that must be refused (exit 2)."""
    body = {**MINIMAL, **sections}
    body.setdefault("finetune", {"method": "qlora"})
    result = CliRunner().invoke(cli, ["validate", str(write_recipe(tmp_path, body))])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


# --------------------------------------------------------------------------------- schema


def test_qlora_takes_the_lora_block_and_its_own():
    recipe = validate_data(
        {
            **MINIMAL,
            "finetune": {
                "method": "qlora",
                "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj"], "use_rslora": True},
                "qlora": {"quant_type": "fp4", "double_quant": False},
            },
        }
    )
    assert recipe.finetune.lora.r == 16 and recipe.finetune.lora.use_rslora
    assert (recipe.finetune.qlora.quant_type, recipe.finetune.qlora.double_quant) == ("fp4", False)
    defaults = qlora_recipe().finetune.qlora
    assert (defaults.quant_type, defaults.double_quant) == ("nf4", True)


def test_the_qlora_block_is_refused_for_other_methods():
    with pytest.raises(
        RecipeError, match=r"finetune\.qlora: only applies to finetune\.method: qlora"
    ):
        validate_data({**MINIMAL, "finetune": {"method": "lora", "qlora": {"quant_type": "nf4"}}})


def test_qlora_settings_are_checked(tmp_path):
    out = refusal(tmp_path, finetune={"method": "qlora", "qlora": {"quant_type": "int4"}})
    assert "finetune.qlora.quant_type: Input should be 'nf4' or 'fp4' (got 'int4')" in out
    out = refusal(tmp_path, finetune={"method": "qlora", "qlora": {"double_quantization": True}})
    assert "finetune.qlora.double_quantization" in out and "double_quant" in out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_qlora_runs_with_deepspeed_zero3_only(tmp_path, stage):
    assert qlora_recipe(strategy={"name": "deepspeed", "zero_stage": 3}).strategy.zero_stage == 3
    out = refusal(tmp_path, strategy={"name": "deepspeed", "zero_stage": stage})
    assert (
        f"strategy.zero_stage: finetune.method qlora with deepspeed runs with zero_stage: 3 "
        f"(got {stage})"
    ) in out
    assert "use zero_stage: 3 to partition the base, or strategy.name: ddp" in out


def test_qlora_with_deepspeed_refuses_offload(tmp_path):
    zero3 = {"name": "deepspeed", "zero_stage": 3}
    out = refusal(tmp_path, strategy={**zero3, "offload": "optimizer"})
    assert "strategy.offload: finetune.method qlora with deepspeed runs with offload: none" in out
    raw = {"zero_optimization": {"offload_param": {"device": "cpu"}}}
    out = refusal(tmp_path, strategy={**zero3, "deepspeed_config": raw})
    assert (
        "strategy.deepspeed_config.zero_optimization.offload_param: finetune.method qlora runs "
        "without offload"
    ) in out


def test_qlora_runs_with_fsdp_without_offload(tmp_path):
    assert qlora_recipe(strategy={"name": "fsdp"}).strategy.name == "fsdp"
    out = refusal(tmp_path, strategy={"name": "fsdp", "offload": "all"})
    assert "strategy.offload: finetune.method qlora with fsdp runs with offload: none" in out


def test_qlora_refuses_distillation_and_gguf(tmp_path):
    out = refusal(tmp_path, distill={"teacher": {"name_or_path": "some/teacher"}})
    assert "distill: finetune.method qlora cannot be distilled into" in out
    out = refusal(tmp_path, model={"name_or_path": "some/model", "gguf_file": "m.gguf"})
    assert "model.gguf_file: finetune.method qlora quantizes safetensors weights on load" in out


@pytest.mark.parametrize(
    ("precision", "device", "dtype"),
    [
        ("bf16", "cpu", torch.bfloat16),
        ("no", "cpu", torch.float32),
        ("auto", "cpu", torch.float32),
        ("fp16", "cuda", torch.float16),
    ],
)
def test_compute_dtype_follows_mixed_precision(precision, device, dtype):
    from launcher.finetune import four_bit_settings

    recipe = qlora_recipe(strategy={"mixed_precision": precision})
    settings = four_bit_settings(recipe, device)
    assert settings.compute_dtype == dtype
    assert (settings.quant_type, settings.double_quant) == ("nf4", True)
    # ddp keeps the packed weights in bytes; fsdp and ZeRO-3 gather them in the compute dtype.
    assert settings.storage_dtype == torch.uint8
    sharded = qlora_recipe(strategy={"name": "fsdp", "mixed_precision": precision})
    assert four_bit_settings(sharded, device).storage_dtype == dtype
    zero3 = {"name": "deepspeed", "zero_stage": 3, "mixed_precision": precision}
    assert four_bit_settings(qlora_recipe(strategy=zero3), device).storage_dtype == dtype


def test_shipped_qlora_recipe_is_sized_for_one_24gb_gpu():
    path = Path(__file__).resolve().parent.parent / "recipes" / "qlora-8b.yaml"
    recipe = load_recipe(path)
    f, s = recipe.finetune, recipe.strategy
    assert (f.method, f.qlora.quant_type, f.qlora.double_quant) == ("qlora", "nf4", True)
    assert (s.name, s.mixed_precision, s.activation_checkpointing) == ("ddp", "bf16", True)
    assert recipe.scaling.num_workers == 1 and recipe.data.format == "chat"
    assert "24 GB" in path.read_text().split("\nname:")[0]


# ------------------------------------------------------------------- method and model


@pytest.mark.parametrize(
    ("task", "lora", "trained"),
    [
        ("causal_lm", {"use_dora": True}, r"\.(lora_[AB]\.|lora_magnitude_vector\.)"),
        ("classification", {}, r"\.lora_[AB]\.|^base_model\.model\.score\.modules_to_save\."),
    ],
)
def test_four_bit_base_trains_dora_and_a_classification_head(tiny_llama, task, lora, trained):
    import re

    from launcher.finetune import apply_finetune, load_base_model
    from launcher.objectives import compute_loss

    body = {
        "name": "q",
        "model": {"name_or_path": str(tiny_llama), "task": task},
        "data": {"train": "t.jsonl"},
        "finetune": {"method": "qlora", "lora": {"dropout": 0.0, **lora}},
    }
    if task == "classification":
        body["model"]["labels"] = ["negative", "positive"]
        body["data"]["format"] = "classification"
    recipe = validate_data(body)
    torch.manual_seed(0)
    model = apply_finetune(load_base_model(recipe, pad_token_id=0), recipe)
    kinds = {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["q_proj"] != "Linear" and "Linear4bit" in set(kinds.values())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(re.search(trained, n) for n in names), names
    if task == "classification":  # the new head trains whole, unquantized
        assert type(model.base_model.model.score.modules_to_save["default"]).__name__ == "Linear"
    ids = torch.randint(3, 400, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = ids if task == "causal_lm" else torch.tensor([0, 1, 0, 1])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = compute_loss(model, batch, task)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------- the job


def job_recipe(
    tmp_path: Path, model: Path, files: dict, storage: str, strategy: str = "ddp", **options
) -> Path:
    body = job_body(
        tmp_path,
        model,
        files,
        name="tiny-qlora",
        train={"max_steps": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1, "seed": 0},
        checkpoint={"storage_path": str(tmp_path / storage), "every": 4, "metric": None},
        finetune={"method": "qlora", "lora": {"r": 8, "dropout": 0.0}},
    )
    body["scaling"] = {"num_workers": 1}
    body["strategy"] = {"name": strategy, **options}
    return write_recipe(tmp_path, body, f"{storage}.yaml")


@pytest.fixture(scope="module")
def qlora_run(ray_session, tiny_llama, story_data, tmp_path_factory):
    """One in-process qlora job; the module it trained is kept for comparison."""
    from launcher import finetune
    from launcher.job import run

    tmp_path = tmp_path_factory.mktemp("qlora")
    recipe = load_recipe(job_recipe(tmp_path, tiny_llama, story_data, "runs"))
    trained: list[torch.nn.Module] = []
    apply = finetune.apply_finetune

    def keep(model, recipe):
        trained.append(apply(model, recipe))
        return trained[-1]

    patch = pytest.MonkeyPatch()
    patch.setattr(finetune, "apply_finetune", keep)
    try:
        summary = run(recipe)
    finally:
        patch.undo()
    return {"summary": summary, "recipe": recipe, "trained": trained[0], "tmp": tmp_path}


def token_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["The harbour was quiet that morning.", "She opened the old wooden door."]
    return tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.ray_job
def test_qlora_job_trains_lora_on_a_four_bit_base(qlora_run):
    summary, trained = qlora_run["summary"], qlora_run["trained"]
    assert summary["status"] == "succeeded" and summary["method"] == "qlora"
    run_dir = Path(summary["run_dir"])
    losses = [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.95, losses

    kinds = {type(m).__name__ for m in trained.modules()}
    assert "Linear4bit" in kinds
    assert {p.dtype for n, p in trained.named_parameters() if ".base_layer." in n} == {torch.uint8}
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # The checkpoint holds the LoRA weights alone: the 4-bit base is rebuilt from the model.
    checkpoint = run_dir / "checkpoints" / "checkpoint_000008" / "model.pt"
    assert sorted(torch.load(checkpoint, weights_only=True)) == sorted(trainable)


@pytest.mark.ray_job
def test_qlora_export_adapter_matches_training_and_merged_model(qlora_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.finetune import load_base_model

    run_dir = Path(qlora_run["summary"]["run_dir"])
    ids = token_ids(tiny_llama)
    info = json.loads((run_dir / "model" / "ftlaunch_export.json").read_text())
    assert (info["method"], info["merged"], info["standalone"]) == ("qlora", True, True)
    assert info["dtype"] == "float32"  # the tiny base was saved in fp32
    assert info["trained_on"]["quant_type"] == "nf4" and info["trained_on"]["double_quant"]

    as_trained = logits(qlora_run["trained"], ids)
    four_bit = load_base_model(qlora_run["recipe"])
    on_four_bit = PeftModel.from_pretrained(four_bit, str(run_dir / "adapter"))
    torch.testing.assert_close(logits(on_four_bit, ids), as_trained, atol=1e-5, rtol=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    # 4-bit weights count as the weights they stand for, not as their packed bytes.
    counted = qlora_run["summary"]["parameters"]
    assert counted["total"] == sum(p.numel() for p in merged.parameters()) + counted["trainable"]
    plain_base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    on_plain = PeftModel.from_pretrained(plain_base, str(run_dir / "adapter"))
    torch.testing.assert_close(logits(merged, ids), logits(on_plain, ids), atol=1e-5, rtol=1e-5)
    # The full-precision base differs from its 4-bit version by the quantization error only.
    gap = (logits(merged, ids) - as_trained).abs().max()
    assert gap < 0.3 * as_trained.abs().max(), gap


@pytest.mark.ray_job
@pytest.mark.slow
def test_stopped_qlora_run_resumes_to_the_same_adapter(
    qlora_run, tiny_llama, story_data, monkeypatch
):
    from safetensors.torch import load_file

    from launcher.job import run
    from launcher.train import JobError

    tmp_path = qlora_run["tmp"]
    recipe = load_recipe(job_recipe(tmp_path, tiny_llama, story_data, "stopped"))
    monkeypatch.setenv("FTLAUNCH_FAIL_AT_STEP", "5")
    monkeypatch.setenv("FTLAUNCH_FAIL_RANK", "0")
    with pytest.raises(JobError):
        run(recipe)
    run_dir = next((tmp_path / "stopped").iterdir())
    monkeypatch.delenv("FTLAUNCH_FAIL_AT_STEP")
    resumed = run(recipe, resume=run_dir)
    assert resumed["steps"] == 8

    straight = Path(qlora_run["summary"]["run_dir"]) / "adapter" / "adapter_model.safetensors"
    a, b = load_file(straight), load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- fsdp

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def fsdp_recipe(model_dir, mixed_precision: str = "no"):
    return validate_data(
        {
            "name": "q",
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "t.jsonl"},
            "finetune": {"method": "qlora", "lora": {"dropout": 0.0}},
            "strategy": {"name": "fsdp", "mixed_precision": mixed_precision},
            "train": {"lr": 1e-2},
        }
    )


def build_qlora(recipe):
    from launcher.finetune import apply_finetune, load_base_model

    torch.manual_seed(0)  # LoRA starts alike in every build
    return apply_finetune(load_base_model(recipe, pad_token_id=0), recipe)


def sharded(recipe, total_steps: int = 8):
    """(strategy, module) of the qlora model sharded by the fsdp strategy."""
    from launcher.strategies import make_strategy

    strategy = make_strategy(recipe, "cpu")
    model = strategy.build(lambda: build_qlora(recipe))
    return strategy, strategy.prepare(model, total_steps)


def train_steps(strategy, module, ids: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = module(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        strategy.step()
        losses.append(loss.item())
    return losses


def sample_ids(rows: int = 4) -> torch.Tensor:
    return torch.randint(3, 500, (rows, 16), generator=torch.Generator().manual_seed(1))


def test_an_evaluation_leaves_the_four_bit_base_computing_as_in_training(tiny_llama):
    """On CPUs with AVX512-BF16, bitsandbytes would repack the 4-bit weights on a no-grad
    forward and compute with another kernel after it: the losses after an evaluation would
    drift from those of a run resumed from a checkpoint."""
    model = build_qlora(fsdp_recipe(tiny_llama))
    ids = sample_ids()
    model.train()
    before = model(input_ids=ids, labels=ids).loss.item()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    model.train()
    assert model(input_ids=ids, labels=ids).loss.item() == before


def test_fsdp_shards_the_four_bit_base_and_checkpoints_the_adapter(tiny_llama, tmp_path):
    """One rank in this process: the sharded 4-bit model computes what the unsharded one does,
    trains LoRA only, checkpoints LoRA only, resumes to the same weights and exports."""
    from peft import PeftModel
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.export import consolidate, export_checkpoint
    from launcher.finetune import load_base_model
    from launcher.train import single_process_group

    recipe = fsdp_recipe(tiny_llama)
    ids = sample_ids()
    with single_process_group("fsdp", in_process=True):
        unsharded = build_qlora(recipe)
        with torch.no_grad():
            expected = unsharded(input_ids=ids, labels=ids).loss.item()
        strategy, module = sharded(recipe)
        weight = dict(module.named_parameters())[f"{Q_PROJ}.base_layer.weight"]
        assert type(module.get_submodule(f"{Q_PROJ}.base_layer")).__name__ == "Linear4bit"
        assert isinstance(weight, DTensor) and weight.dtype == torch.float32  # packed storage
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        with torch.no_grad():
            assert module(input_ids=ids, labels=ids).loss.item() == pytest.approx(expected, 1e-6)

        losses = train_steps(strategy, module, ids, 2)
        strategy.save(tmp_path / "mid")
        losses += train_steps(strategy, module, ids, 2)
        strategy.save(tmp_path / "end")
        assert losses[-1] < losses[0], losses
        resumed_strategy, resumed = sharded(recipe)
        resumed_strategy.load(tmp_path / "mid")
        again = train_steps(resumed_strategy, resumed, ids, 2)
        assert again == pytest.approx(losses[2:], rel=1e-5)
        with torch.no_grad():
            as_trained = module(input_ids=ids).logits.float()

    end = consolidate("fsdp", tmp_path / "end")
    assert sorted(end) == sorted(trainable)  # the checkpoint holds LoRA alone
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    info = export_checkpoint(recipe, tmp_path / "end", tmp_path / "out", tokenizer, merge=True)
    assert (info["method"], info["merged"]) == ("qlora", True)
    adapter = str(tmp_path / "out" / "adapter")
    on_four_bit = PeftModel.from_pretrained(load_base_model(recipe), adapter)
    torch.testing.assert_close(logits(on_four_bit, ids), as_trained, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    on_plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    torch.testing.assert_close(logits(merged, ids), logits(on_plain, ids), atol=1e-5, rtol=1e-5)


def _two_rank_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    join_gloo_group(rank, 2, port)
    try:
        recipe = fsdp_recipe(model_dir, mixed_precision="bf16")
        ids = sample_ids(8)[rank * 4 : rank * 4 + 4]
        with torch.no_grad():
            expected = build_qlora(recipe)(input_ids=ids, labels=ids).loss.item()
        strategy, module = sharded(recipe)
        weight = dict(module.named_parameters())[f"{Q_PROJ}.base_layer.weight"]
        with torch.no_grad():
            loss = module(input_ids=ids, labels=ids).loss.item()
        record = {
            "dtype": str(weight.dtype),
            "rows": [weight.shape[0], weight.to_local().shape[0]],
            "loss": loss,
            "expected": expected,
            "losses": train_steps(strategy, module, ids, 4),
        }
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_fsdp_ranks_each_hold_half_of_the_four_bit_weights(tiny_llama, tmp_path):
    """bf16: the packed weights stored in bfloat16, half of them on each rank, gathered back
    bit for bit (the loss matches the unsharded 4-bit model's up to bf16 LoRA rounding)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _two_rank_worker,
        args=(port, str(tiny_llama), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        full, local = record["rows"]
        assert record["dtype"] == "torch.bfloat16" and local == full // 2
        assert record["loss"] == pytest.approx(record["expected"], rel=1e-3)
        assert record["losses"][-1] < record["losses"][0], record["losses"]


def run_lora_only_job(recipe, strategy: str) -> tuple[Path, dict]:
    """Run a qlora job and check what every strategy shares: 8 steps whose loss falls, the
    last checkpoint holding the LoRA weights alone, a merged export. Returns the run directory
    and the export record."""
    from launcher.export import consolidate
    from launcher.job import run

    summary = run(recipe)
    assert summary["status"] == "succeeded"
    run_dir = Path(summary["run_dir"])
    losses = [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.95, losses
    state = consolidate(strategy, run_dir / "checkpoints" / "checkpoint_000008")
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    info = json.loads((run_dir / "model" / "ftlaunch_export.json").read_text())
    assert (info["method"], info["merged"]) == ("qlora", True)
    return run_dir, info


@pytest.mark.ray_job
@pytest.mark.slow
def test_qlora_fsdp_job_checkpoints_lora_and_exports(ray_session, tiny_llama, story_data, tmp_path):
    """The whole job with one fsdp worker (in this process): the worker loop, the sharded
    checkpoints of the LoRA weights alone and the export from them."""
    recipe = load_recipe(job_recipe(tmp_path, tiny_llama, story_data, "fsdp", strategy="fsdp"))
    run_dir, _ = run_lora_only_job(recipe, "fsdp")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------- deepspeed ZeRO-3


def zero3_recipe(model_dir):
    """qlora under ZeRO-3, every parameter partitioned (the tiny model's are all below
    DeepSpeed's default size for keeping a parameter whole on every rank)."""
    return validate_data(
        {
            "name": "q",
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "t.jsonl"},
            "finetune": {"method": "qlora", "lora": {"dropout": 0.0}},
            "strategy": {
                "name": "deepspeed",
                "zero_stage": 3,
                "mixed_precision": "no",
                "deepspeed_config": {
                    "zero_optimization": {"stage3_param_persistence_threshold": 0}
                },
            },
            "train": {"lr": 1e-2, "batch_size": 8},
        }
    )


def _zero3_worker(rank: int, world: int, port: int, model_dir: str, out: str, resume: str) -> None:
    """Rank `rank` of `world`: the rows 0-7 of sample_ids split between the ranks. Without
    `resume`: check the partitioned model against the unpartitioned one, train 2 steps, save
    (mid), train 2 more, save (end). With it: load `resume`, train 2 steps, save (end)."""
    import os

    import torch.distributed as dist

    from launcher.strategies import make_strategy

    os.environ["DS_ACCELERATOR"] = "cpu"
    join_gloo_group(rank, world, port)
    try:
        recipe = zero3_recipe(model_dir)
        rows = 8 // world
        ids = sample_ids(8)[rank * rows : (rank + 1) * rows]
        record: dict = {}
        if not resume:
            with torch.no_grad():
                record["expected"] = build_qlora(recipe)(input_ids=ids, labels=ids).loss.item()
        strategy = make_strategy(recipe, "cpu")
        module = strategy.prepare(strategy.build(lambda: build_qlora(recipe)), 8)
        out_dir = Path(out)
        if resume:
            strategy.load(Path(resume))
            record["losses"] = train_steps(strategy, module, ids, 2)
            strategy.save(out_dir / f"end-{world}")
        else:
            weight = dict(module.module.named_parameters())[f"{Q_PROJ}.base_layer.weight"]
            record["packed"] = [str(weight.ds_tensor.dtype), weight.ds_numel]
            record["local"] = weight.ds_tensor.numel()
            with torch.no_grad():
                record["loss"] = module(input_ids=ids, labels=ids).loss.item()
            record["losses"] = train_steps(strategy, module, ids, 2)
            strategy.save(out_dir / "mid")
            record["losses"] += train_steps(strategy, module, ids, 2)
            strategy.save(out_dir / f"end-{world}")
        (out_dir / f"rank{rank}-of-{world}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def spawn_ranks(world: int, model_dir: Path, out: Path, resume: str = "") -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _zero3_worker,
        args=(world, port, str(model_dir), str(out), resume),
        nprocs=world,
        start_method="spawn",
    )


@pytest.mark.slow
def test_zero3_partitions_the_four_bit_base_and_resumes_at_another_world_size(tiny_llama, tmp_path):
    """Two ranks: each holds half of the packed 4-bit weights (float32 storage), the loss is
    the unpartitioned model's, the checkpoint holds LoRA alone. One rank then resumes the
    two-rank checkpoint on all the rows and ends where the two ranks ended."""
    from launcher.export import consolidate

    spawn_ranks(2, tiny_llama, tmp_path)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}-of-2.json").read_text())
        dtype, full = record["packed"]
        assert dtype == "torch.float32" and record["local"] == full // 2
        assert record["loss"] == pytest.approx(record["expected"], rel=1e-6)
        assert record["losses"][-1] < record["losses"][0], record["losses"]
    two = consolidate("deepspeed", tmp_path / "end-2")
    trainable = build_qlora(zero3_recipe(tiny_llama)).named_parameters()
    assert sorted(two) == sorted(n for n, p in trainable if p.requires_grad)
    assert all(".lora_A." in n or ".lora_B." in n for n in two)

    spawn_ranks(1, tiny_llama, tmp_path, resume=str(tmp_path / "mid"))
    one = consolidate("deepspeed", tmp_path / "end-1")
    assert one.keys() == two.keys()
    for key in two:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)


@pytest.mark.ray_job
@pytest.mark.slow
def test_qlora_zero3_job_checkpoints_lora_and_exports(
    ray_session, tiny_llama, story_data, tmp_path
):
    """The whole job with one deepspeed ZeRO-3 worker (its own process): the loss falls, the
    checkpoints hold the LoRA weights alone, and the export's merged model computes what the
    adapter does on the unquantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.finetune import load_base_model

    recipe = load_recipe(
        job_recipe(tmp_path, tiny_llama, story_data, "zero3", "deepspeed", zero_stage=3)
    )
    run_dir, info = run_lora_only_job(recipe, "deepspeed")
    assert info["dtype"] == "float32"

    ids = token_ids(tiny_llama)
    adapter = str(run_dir / "adapter")
    merged = logits(AutoModelForCausalLM.from_pretrained(run_dir / "model"), ids)
    on_plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    torch.testing.assert_close(merged, logits(on_plain, ids), atol=1e-5, rtol=1e-5)
    on_four_bit = logits(PeftModel.from_pretrained(load_base_model(recipe), adapter), ids)
    assert (merged - on_four_bit).abs().max() < 0.3 * on_four_bit.abs().max()

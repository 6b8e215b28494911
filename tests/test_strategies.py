"""Strategies: shared helpers (fast, in-process) and real 2-rank training with gloo (spawned).

The distributed checks share one spawned job per world size: every strategy trains the same
tiny GPT-2 on the same data in the same two processes, so first-step losses and parameters after
K steps can be compared across strategies, and each writes a checkpoint that the driver process
(no process group) consolidates and reloads.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from helpers import join_gloo_group

from launcher.deepspeed_config import (
    DeepSpeedConfigError,
    check_deepspeed_overrides,
    deepspeed_config,
)
from launcher.export import consolidate
from launcher.recipe import Recipe
from launcher.strategies import (
    build_optimizer,
    build_schedule,
    make_strategy,
    read_strategy_file,
    resident_parameter_bytes,
    resolve_precision,
)

STEPS = 6
MID = 3  # a checkpoint is saved before this step and resumed from by one rank
GRAD_ACCUM = 2
BATCH = 4
SEQ = 24
LR = 5e-3
# Same math in every strategy; only float summation order differs (all-reduce vs reduce-scatter,
# flat vs per-tensor norms), so parameters after STEPS agree to well below the update size.
PARAM_TOLERANCE = 1e-4


def make_recipe(model_dir: Path | str, **strategy) -> Recipe:
    return Recipe(
        name="strategy-test",
        model={"name_or_path": str(model_dir)},
        data={"train": "unused.jsonl"},
        train={
            "batch_size": BATCH,
            "grad_accum": GRAD_ACCUM,
            "lr": LR,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "warmup_ratio": 0.2,
            "scheduler": "linear",
        },
        strategy=strategy or {"name": "ddp"},
    )


# ------------------------------------------------------------------------- fast unit tests


def _small_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2, bias=False)
    )


def test_optimizer_skips_decay_on_biases_and_norms(tmp_path):
    recipe = make_recipe(tmp_path)
    model = _small_model()
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(model, recipe.train)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([8, 4])]
    # bias of layer 0, LayerNorm weight and bias; the frozen layer is left out entirely
    assert [p.shape for p in plain["params"]] == [torch.Size([8])] * 3
    assert decayed["betas"] == (0.9, 0.999)


def test_optimizer_refuses_a_model_with_nothing_to_train(tmp_path):
    model = _small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, make_recipe(tmp_path).train)


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0]),
    ],
)
def test_schedule_warms_up_then_follows_its_shape(tmp_path, scheduler, expected):
    recipe = make_recipe(tmp_path)
    train = recipe.train.model_copy(update={"warmup_ratio": 0.2, "scheduler": scheduler})
    opt = build_optimizer(_small_model(), train)
    sched = build_schedule(opt, train, total_steps=6)  # ceil(0.2 * 6) = 2 warmup steps
    factors = []
    for _ in range(7):
        factors.append(sched.get_last_lr()[0] / LR)
        opt.step()
        sched.step()
    assert factors == pytest.approx(expected, abs=1e-4)


def test_precision_auto_is_fp32_on_cpu_and_explicit_choices_are_honoured(tmp_path):
    assert resolve_precision(make_recipe(tmp_path), "cpu") is None
    bf16 = make_recipe(tmp_path, name="ddp", mixed_precision="bf16")
    assert resolve_precision(bf16, "cpu") is torch.bfloat16
    assert resolve_precision(make_recipe(tmp_path, name="ddp", mixed_precision="no"), "cpu") is None
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision(make_recipe(tmp_path, name="ddp", mixed_precision="fp16"), "cpu")


DEEPSPEED_COMM_START = """
import sys
import torch.distributed as dist
from launcher.sharded_load import import_deepspeed

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
deepspeed = import_deepspeed()
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
sys.exit(0 if deepspeed.comm.comm.cdb.shm_comm_op is None else 3)
"""


def test_deepspeed_communication_starts_without_building_its_shared_memory_op(tmp_path):
    """The op serves tensor-parallel inference only; building it took a minute of compiling on
    a CPU machine's first ZeRO job (and fails without a compiler)."""
    import os
    import subprocess
    import sys

    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_COMM_START],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not extensions.exists() or not any(extensions.rglob("*shm*"))


def test_deepspeed_config_follows_the_recipe(tmp_path):
    recipe = make_recipe(
        tmp_path,
        name="deepspeed",
        zero_stage=3,
        offload="all",
        deepspeed_config={"zero_optimization": {"stage3_max_live_parameters": 1000}},
    )
    config = deepspeed_config(recipe, world_size=2, device="cpu")
    assert config["train_micro_batch_size_per_gpu"] == BATCH
    assert config["gradient_accumulation_steps"] == GRAD_ACCUM
    assert config["train_batch_size"] == BATCH * GRAD_ACCUM * 2
    assert config["gradient_clipping"] == 1.0
    assert config["optimizer"]["type"] == "AdamW"
    params = config["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["weight_decay"]) == (LR, [0.9, 0.999], 0.01)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_max_live_parameters"] == 1000  # an override that contradicts nothing
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert "scheduler" not in config  # the launcher's own schedule is handed to DeepSpeed
    bf16 = make_recipe(tmp_path, name="deepspeed", zero_stage=1, mixed_precision="bf16")
    config = deepspeed_config(bf16, world_size=1)
    assert config["bf16"]["enabled"] is True and "offload_optimizer" not in config.get(
        "zero_optimization", {}
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 16},
            "strategy.deepspeed_config.train_micro_batch_size_per_gpu: 16 contradicts "
            "train.batch_size: 4",
        ),
        (
            {"zero_optimization": {"stage": 1}},
            "strategy.deepspeed_config.zero_optimization.stage: 1 contradicts strategy.zero_stage: 2",
        ),
        (
            {"optimizer": {"params": {"lr": 0.1}}},
            "strategy.deepspeed_config.optimizer.params.lr: 0.1 contradicts train.lr: 0.005",
        ),
        (
            {"gradient_accumulation_steps": 8},
            "strategy.deepspeed_config.gradient_accumulation_steps: 8 contradicts train.grad_accum: 2",
        ),
        (
            {"bf16": {"enabled": True}},
            "strategy.deepspeed_config.bf16.enabled: True contradicts strategy.mixed_precision: no",
        ),
        (
            {"scheduler": {"type": "WarmupLR"}},
            "strategy.deepspeed_config.scheduler: {'type': 'WarmupLR'} contradicts "
            "train.scheduler: linear",
        ),
    ],
)
def test_deepspeed_overrides_that_contradict_the_recipe_name_both_values(
    tmp_path, overrides, message
):
    recipe = make_recipe(
        tmp_path, name="deepspeed", mixed_precision="no", deepspeed_config=overrides
    )
    with pytest.raises(DeepSpeedConfigError) as err:
        deepspeed_config(recipe, world_size=2)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)
    assert any(message in p for p in check_deepspeed_overrides(recipe))


def test_deepspeed_overrides_that_agree_are_accepted_and_offload_all_needs_stage_3(tmp_path):
    agreeing = {"train_micro_batch_size_per_gpu": BATCH, "optimizer": {"type": "adamw"}}
    recipe = make_recipe(tmp_path, name="deepspeed", deepspeed_config=agreeing)
    assert check_deepspeed_overrides(recipe) == []
    assert deepspeed_config(recipe, world_size=2)["train_micro_batch_size_per_gpu"] == BATCH
    stage2_all = make_recipe(tmp_path, name="deepspeed", zero_stage=2, offload="all")
    assert check_deepspeed_overrides(stage2_all) == [
        "strategy.offload: all offloads parameters, which needs strategy.zero_stage: 3 (got 2); "
        "use offload: optimizer"
    ]
    assert check_deepspeed_overrides(make_recipe(tmp_path)) == []  # ddp: nothing to check


def test_ddp_bf16_runs_forward_under_autocast_and_keeps_fp32_weights(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(tiny_gpt2, name="ddp", mixed_precision="bf16")
    strategy = make_strategy(recipe, "cpu")
    module = strategy.prepare(AutoModelForCausalLM.from_pretrained(tiny_gpt2), total_steps=2)
    ids = torch.randint(0, 500, (2, 16))
    out = module(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    for _ in range(GRAD_ACCUM):
        strategy.backward(out.loss if _ == 0 else module(input_ids=ids, labels=ids).loss)
    assert math.isfinite(strategy.step())
    assert {p.dtype for p in strategy.unwrapped().parameters()} == {torch.float32}
    assert "module." not in next(iter(strategy.unwrapped().state_dict()))


def test_single_process_ddp_trains_saves_and_resumes(tiny_gpt2, tmp_path):
    """World size 1 (no process group): no wrapping, same save/load/consolidate contract."""
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(tiny_gpt2)
    strategy = make_strategy(recipe, "cpu")
    torch.manual_seed(0)
    model = strategy.build(lambda: AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    module = strategy.prepare(model, total_steps=4)
    ids = torch.randint(0, 500, (2, 16))
    for _ in range(2):
        for micro in range(GRAD_ACCUM):
            with strategy.no_sync(micro < GRAD_ACCUM - 1):
                strategy.backward(module(input_ids=ids, labels=ids).loss)
        assert strategy.step() > 0
    strategy.save(tmp_path / "ckpt")
    assert read_strategy_file(tmp_path / "ckpt") == {"strategy": "ddp", "world_size": 1}
    state = consolidate("ddp", tmp_path / "ckpt")
    assert set(state) == set(strategy.unwrapped().state_dict())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())

    again = make_strategy(recipe, "cpu")
    fresh = again.prepare(AutoModelForCausalLM.from_pretrained(tiny_gpt2), total_steps=4)
    again.load(tmp_path / "ckpt")
    assert again.lr() == pytest.approx(strategy.lr())
    assert again.schedule.last_epoch == 2
    ref = strategy.optimizer.state_dict()["state"]
    got = again.optimizer.state_dict()["state"]
    assert torch.equal(ref[0]["exp_avg"], got[0]["exp_avg"])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, module(input_ids=ids).logits)
    with pytest.raises(ValueError, match="cannot consolidate strategy 'zero'"):
        consolidate("zero", tmp_path / "ckpt")


# ------------------------------------------------------------------ spawned 2-rank training


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batches(model_dir: str) -> torch.Tensor:
    """The global batch of every step: (2 * GRAD_ACCUM * BATCH, SEQ) token ids, no padding."""
    from transformers import AutoTokenizer

    from launcher.dev.synthetic import story_lines

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(" ".join(story_lines(200, seed=7)))["input_ids"]
    rows = 2 * GRAD_ACCUM * BATCH  # the same data whatever the world size
    return torch.tensor(ids[: rows * SEQ]).view(rows, SEQ)


def _load_tiny(model_dir: str):
    from launcher.models import load_model

    return load_model(make_recipe(model_dir).model)


def _local_micro_batches(rows: torch.Tensor, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one step: the global batch split over ranks and micro-steps.

    Every row has SEQ tokens, so the mean loss over the global batch is the same for any split.
    """
    per_rank = rows.shape[0] // world
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    micro = per_rank // GRAD_ACCUM
    return [mine[i * micro : (i + 1) * micro] for i in range(GRAD_ACCUM)]


def _train_one(spec: dict, model_dir: str, out: Path, rank: int, world: int) -> None:
    """Train one spec for steps [start, STEPS); save a mid-run and a final checkpoint."""
    import torch.distributed as dist

    started = time.perf_counter()
    recipe = make_recipe(model_dir, **spec["strategy"])
    strategy = make_strategy(recipe, "cpu")
    torch.manual_seed(0)
    model = strategy.build(lambda: _load_tiny(model_dir))
    built_bytes = resident_parameter_bytes(model)
    module = strategy.prepare(model, total_steps=STEPS * 2)
    start = 0
    if "load_from" in spec:
        strategy.load(Path(spec["load_from"]))
        start = MID
    prepared = time.perf_counter()
    rows = _batches(model_dir)
    losses, norms, lrs = [], [], []
    for step in range(start, STEPS):
        if step == MID and start == 0:
            strategy.save(out / f"{spec['id']}-mid")
        step_loss = torch.zeros(())
        for micro, ids in enumerate(_local_micro_batches(rows, rank, world)):
            with strategy.no_sync(micro < GRAD_ACCUM - 1):
                loss = module(input_ids=ids, labels=ids).loss
                strategy.backward(loss)
            step_loss += loss.detach() / GRAD_ACCUM
        dist.all_reduce(step_loss)
        losses.append(float(step_loss) / world)
        lrs.append(strategy.lr())
        norms.append(strategy.step())
    state_bytes = strategy.local_state_bytes()
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=rows[:2]).logits.float()
    module.train()
    strategy.save(out / spec["id"])
    if rank == 0:
        torch.save(logits, out / f"{spec['id']}.logits.pt")
    seconds = {"prepare": prepared - started, "total": time.perf_counter() - started}
    record = {"losses": losses, "norms": norms, "lrs": lrs, "bytes": state_bytes}
    record["built_bytes"] = built_bytes
    record["seconds"] = seconds
    (out / f"{spec['id']}.rank{rank}.json").write_text(json.dumps(record))


def _worker(rank: int, world: int, port: int, specs: list[dict], model_dir: str, out: str):
    import torch.distributed as dist

    join_gloo_group(rank, world, port)
    try:
        for spec in specs:
            _train_one(spec, model_dir, Path(out), rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, specs: list[dict], model_dir: Path, out: Path, worker=_worker) -> None:
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        worker,
        args=(world, _free_port(), specs, str(model_dir), str(out)),
        nprocs=world,
        start_method="spawn",
    )


def result(out: Path, spec_id: str, rank: int = 0) -> dict:
    return json.loads((out / f"{spec_id}.rank{rank}.json").read_text())


SPECS = [
    {"id": "ddp", "strategy": {"name": "ddp"}},
    {"id": "fsdp", "strategy": {"name": "fsdp"}},
    {"id": "fsdp-offload", "strategy": {"name": "fsdp", "offload": "all"}},
    {"id": "fsdp-ac", "strategy": {"name": "fsdp", "activation_checkpointing": True}},
    {"id": "ds0", "strategy": {"name": "deepspeed", "zero_stage": 0}},
    {"id": "ds1", "strategy": {"name": "deepspeed", "zero_stage": 1}},
    {"id": "ds2", "strategy": {"name": "deepspeed", "zero_stage": 2}},
    {"id": "ds3", "strategy": {"name": "deepspeed", "zero_stage": 3}},
    {
        "id": "ds2-offload",
        "strategy": {"name": "deepspeed", "zero_stage": 2, "offload": "optimizer"},
    },
    {
        "id": "ds3-offload",
        "strategy": {"name": "deepspeed", "zero_stage": 3, "offload": "optimizer"},
    },
    {
        "id": "ds3-ac",
        "strategy": {"name": "deepspeed", "zero_stage": 3, "activation_checkpointing": True},
    },
]


@pytest.fixture(scope="module")
def still_gpt2(tiny_gpt2, tmp_path_factory) -> Path:
    """The tiny GPT-2 without dropout: every strategy must do the same math for the comparisons
    to mean anything."""
    from transformers import AutoConfig

    out = tmp_path_factory.mktemp("still") / "gpt2"
    shutil.copytree(tiny_gpt2, out)
    config = AutoConfig.from_pretrained(out)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_rank_run(still_gpt2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-rank")
    spawn(2, SPECS, still_gpt2, out)
    return out


def _fresh_logits(model_dir: Path, state: dict, probe: torch.Tensor) -> torch.Tensor:
    model = _load_tiny(str(model_dir))
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe).logits


@pytest.mark.slow
@pytest.mark.parametrize("spec_id", [s["id"] for s in SPECS])
def test_two_ranks_loss_falls_and_consolidated_model_matches(two_rank_run, still_gpt2, spec_id):
    losses = result(two_rank_run, spec_id)["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    name = read_strategy_file(two_rank_run / spec_id)["strategy"]
    assert read_strategy_file(two_rank_run / spec_id)["world_size"] == 2
    state = consolidate(name, two_rank_run / spec_id)
    assert set(state) == set(_load_tiny(str(still_gpt2)).state_dict())
    probe = _batches(str(still_gpt2))[:2]
    trained = torch.load(two_rank_run / f"{spec_id}.logits.pt")
    torch.testing.assert_close(_fresh_logits(still_gpt2, state, probe), trained, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_strategies_do_the_same_math(two_rank_run):
    """Same seed and data: identical first-step loss, parameters within PARAM_TOLERANCE."""
    reference = result(two_rank_run, "ddp")
    ref_state = consolidate("ddp", two_rank_run / "ddp")
    for spec in SPECS[1:]:
        got = result(two_rank_run, spec["id"])
        assert got["losses"][0] == pytest.approx(reference["losses"][0], abs=1e-6), spec["id"]
        assert got["losses"] == pytest.approx(reference["losses"], rel=1e-4), spec["id"]
        assert got["lrs"] == pytest.approx(reference["lrs"], rel=1e-9), spec["id"]
        state = consolidate(spec["strategy"]["name"], two_rank_run / spec["id"])
        worst = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
        assert worst < PARAM_TOLERANCE, (spec["id"], worst)
    # the parameters did move: the tolerance is far below the change made by training
    initial = consolidate("ddp", two_rank_run / "ddp-mid")
    moved = max((initial[k] - ref_state[k]).abs().max().item() for k in ref_state)
    assert moved > 100 * PARAM_TOLERANCE


@pytest.mark.slow
def test_sharded_strategies_hold_about_half_of_ddp_state_per_rank(two_rank_run):
    ddp = result(two_rank_run, "ddp")["bytes"]
    for spec_id in ("fsdp", "fsdp-offload", "ds3", "ds3-offload"):
        for rank in (0, 1):
            ratio = result(two_rank_run, spec_id, rank)["bytes"] / ddp
            assert ratio < 0.6, (spec_id, rank, ratio)
    # ZeRO-1/2 partition only the optimizer state: less than ddp, more than ZeRO-3
    assert 0.6 < result(two_rank_run, "ds2")["bytes"] / ddp < 0.95


@pytest.mark.slow
def test_sharded_builds_never_hold_the_full_model_on_every_rank(two_rank_run):
    """ZeRO-3 builds under zero.Init (each rank its partition); fsdp builds every rank with
    placeholders and reads its shard only after sharding."""
    full = result(two_rank_run, "ddp")["built_bytes"]
    assert full == result(two_rank_run, "ddp", 1)["built_bytes"] > 0
    for rank in (0, 1):
        assert result(two_rank_run, "ds3", rank)["built_bytes"] < 0.6 * full
        assert result(two_rank_run, "fsdp", rank)["built_bytes"] < 0.01 * full


RESUMED = ("ddp", "fsdp", "ds0", "ds1", "ds2", "ds3")  # every ZeRO stage reshards


@pytest.fixture(scope="module")
def one_rank_resume(two_rank_run, still_gpt2) -> Path:
    """Checkpoints written by 2 ranks before step MID, resumed by 1 rank."""
    specs = [
        {
            "id": f"{spec['id']}-resumed",
            "strategy": spec["strategy"],
            "load_from": str(two_rank_run / f"{spec['id']}-mid"),
        }
        for spec in SPECS
        if spec["id"] in RESUMED
    ]
    spawn(1, specs, still_gpt2, two_rank_run)
    return two_rank_run


@pytest.mark.slow
@pytest.mark.parametrize("spec_id", RESUMED)
def test_resume_on_a_different_world_size_continues_training(one_rank_resume, spec_id):
    before = result(one_rank_resume, spec_id)
    after = result(one_rank_resume, f"{spec_id}-resumed")
    assert read_strategy_file(one_rank_resume / f"{spec_id}-mid")["world_size"] == 2
    # Weights and schedule position are kept: the first resumed step sees the same loss and lr.
    assert after["losses"][0] == pytest.approx(before["losses"][MID], abs=1e-5)
    assert after["lrs"] == pytest.approx(before["lrs"][MID:], rel=1e-9)
    assert after["losses"][-1] < after["losses"][0]
    # The optimizer state comes along too (DCP reshards it for fsdp, DeepSpeed's universal format
    # for deepspeed), so the run continues as it would have on 2 ranks.
    assert after["losses"] == pytest.approx(before["losses"][MID:], rel=1e-4)


# ------------------------------------------------------------------- start-up peak memory

PEAK_SPECS = [
    {"id": "ddp", "strategy": {"name": "ddp"}},
    {"id": "fsdp", "strategy": {"name": "fsdp"}},
    {"id": "ds3", "strategy": {"name": "deepspeed", "zero_stage": 3}},
]


def _status_bytes(field: str) -> int:
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1]) * 1024


def _peak_worker(rank: int, world: int, port: int, specs: list[dict], model_dir: str, out: str):
    """Per strategy: the rise of this process's peak resident memory (VmHWM, reset through
    /proc/self/clear_refs) while the model is built and its weights are in place."""
    import gc

    import deepspeed  # noqa: F401  (imports are not the model's cost)
    import safetensors  # noqa: F401
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401

    join_gloo_group(rank, world, port)
    try:
        for spec in specs:
            recipe = make_recipe(model_dir, **spec["strategy"])
            strategy = make_strategy(recipe, "cpu")
            gc.collect()
            dist.barrier()
            baseline = _status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            model = strategy.build(lambda: _load_tiny(model_dir))
            if spec["id"] == "fsdp":  # fsdp reads the weights once sharded
                strategy.prepare(model, total_steps=1)
            rise = _status_bytes("VmHWM") - baseline
            (Path(out) / f"peak-{spec['id']}.rank{rank}.json").write_text(json.dumps(rise))
            del model, strategy
            gc.collect()
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_start_up_never_needs_the_full_model_on_a_worker(tmp_path, monkeypatch):
    """A model of about 100 MB: loading it for ddp raises a worker's peak memory by the whole
    model (so the measurement sees it); fsdp and ZeRO-3 stay well below it on every rank."""
    from launcher.dev.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "wide", "gpt2", width=512, layers=8)
    model_bytes = sum(p.numel() * p.element_size() for p in _load_tiny(str(model_dir)).parameters())
    assert model_bytes > 90e6
    # Large blocks go back to the system when freed, so one spec's memory does not hide the next.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    spawn(2, PEAK_SPECS, model_dir, tmp_path, worker=_peak_worker)
    rise = {
        (spec["id"], rank): json.loads(
            (tmp_path / f"peak-{spec['id']}.rank{rank}.json").read_text()
        )
        for spec in PEAK_SPECS
        for rank in (0, 1)
    }
    ratios = {key: round(value / model_bytes, 2) for key, value in rise.items()}
    assert ratios[("ddp", 0)] > 0.9 and ratios[("ddp", 1)] > 0.9, ratios
    for rank in (0, 1):
        assert ratios[("fsdp", rank)] < 0.75, ratios
        assert ratios[("ds3", rank)] < 0.75, ratios


# ------------------------------------------- checkpoints that cannot be read in parts


def _whole_load_worker(
    rank: int, world: int, port: int, specs: list[dict], model_dir: str, out: str
):
    """Build and prepare each strategy from a checkpoint without safetensors (loaded whole on
    rank 0 for fsdp, under zero.Init for ZeRO-3) and record the sharded model's logits."""
    import torch.distributed as dist

    from launcher.models import checkpoint_sources

    join_gloo_group(rank, world, port)
    try:
        probe = _batches(model_dir)[:2]
        for spec in specs:
            recipe = make_recipe(model_dir, **spec["strategy"])
            strategy = make_strategy(recipe, "cpu")
            model = strategy.build(lambda: _load_tiny(model_dir))
            assert checkpoint_sources(model) == {}  # nothing to read in parts
            module = strategy.prepare(model, total_steps=1)
            module.eval()
            with torch.no_grad():
                logits = module(input_ids=probe).logits.float()
            if rank == 0:
                torch.save(logits, Path(out) / f"whole-{spec['id']}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoints_without_safetensors_are_loaded_whole_and_still_shard(still_gpt2, tmp_path):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    shutil.copytree(still_gpt2, legacy)
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    specs = [
        {"id": "fsdp", "strategy": {"name": "fsdp"}},
        {"id": "ds3", "strategy": {"name": "deepspeed", "zero_stage": 3}},
    ]
    spawn(2, specs, legacy, tmp_path, worker=_whole_load_worker)
    plain = _load_tiny(str(still_gpt2)).eval()
    with torch.no_grad():
        expected = plain(input_ids=_batches(str(still_gpt2))[:2]).logits
    for spec in specs:
        got = torch.load(tmp_path / f"whole-{spec['id']}.pt")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

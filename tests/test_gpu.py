"""GPU checks (`pytest -m gpu`): every strategy, precision, fine-tune method and export path on a
CUDA device. They skip without CUDA; bench/gpu/check.sh runs them on a GPU machine.

One process group (NCCL, world size 1) serves the whole module, as Ray Train's worker would
have it; each strategy trains the tiny GPT-2 on a fixed batch, saves, consolidates and reloads.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from helpers import minimal_recipe

from launcher.export import consolidate
from launcher.recipe import Recipe
from launcher.strategies import make_strategy, read_strategy_file

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

STEPS = 8
BATCH = 4
SEQ = 32
LR = 5e-3


def gpu_recipe(model_dir: Path | str, method: str = "full", **strategy) -> Recipe:
    return Recipe(
        name="gpu-test",
        model={"name_or_path": str(model_dir)},
        data={"train": "unused.jsonl"},
        finetune={"method": method},
        train={"batch_size": BATCH, "lr": LR, "max_grad_norm": 1.0, "scheduler": "constant"},
        strategy=strategy or {"name": "ddp"},
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL process group, and DeepSpeed pointed at CUDA (the test session's
    default is its CPU accelerator, chosen when deepspeed is first imported)."""
    import torch.distributed as dist

    if "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
    )
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _release_previous_engines():
    """A ZeRO-3 strategy left alive would make transformers load the next model partitioned
    (it looks its config up through a weak reference); free it and its GPU memory."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture
def deepspeed_on_cuda(nccl_group):
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != "cuda":
        pytest.skip(f"deepspeed was imported with the {name} accelerator; run this file alone")
    return nccl_group


def _batch(device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 500, (BATCH, SEQ), generator=generator).to(device)


def _load(model_dir: Path | str):
    from launcher.models import load_model

    return load_model(gpu_recipe(model_dir).model)


def train_save_reload(recipe: Recipe, model_dir: Path, device: torch.device, out: Path) -> dict:
    """Train STEPS steps on one fixed batch, save, consolidate on the host, reload into a fresh
    model and compare its logits with the trained module's."""
    strategy = make_strategy(recipe, device)
    torch.manual_seed(0)
    model = strategy.build(lambda: _load(model_dir))
    module = strategy.prepare(model, total_steps=STEPS)
    ids = _batch(device)
    losses = []
    for _ in range(STEPS):
        loss = module(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        losses.append(float(loss))
        assert math.isfinite(strategy.step())
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=ids).logits.float().cpu()
    strategy.save(out)
    state = consolidate(read_strategy_file(out)["strategy"], out)
    fresh = _load(model_dir)
    fresh.load_state_dict(state, strict=True)
    fresh.to(device).eval()
    with torch.no_grad():
        again = fresh(input_ids=ids).logits.float().cpu()
    return {"losses": losses, "logits": logits, "reloaded": again, "strategy": strategy}


def assert_trained_and_reloaded(result: dict, atol: float = 0.05) -> None:
    losses = result["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.9, losses
    # Reloaded weights run in fp32; the trained module may have run in bf16.
    assert (result["logits"] - result["reloaded"]).abs().max() < atol * result["logits"].abs().max()


def test_nccl_collectives_run_on_the_gpu(nccl_group):
    import torch.distributed as dist

    assert dist.get_backend() == "nccl"
    value = torch.ones(4, device=nccl_group)
    dist.all_reduce(value)
    dist.barrier()
    assert value.device.type == "cuda" and value.tolist() == [1.0] * 4


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_ddp_over_nccl_trains_saves_and_reloads(nccl_group, tiny_gpt2, tmp_path, precision):
    recipe = gpu_recipe(tiny_gpt2, name="ddp", mixed_precision=precision)
    result = train_save_reload(recipe, tiny_gpt2, nccl_group, tmp_path / "ckpt")
    assert_trained_and_reloaded(result)
    params = result["strategy"].unwrapped().parameters()
    assert {p.device.type for p in params} == {"cuda"}


def test_ddp_bf16_autocast_gives_bf16_logits_and_fp32_weights(nccl_group, tiny_gpt2):
    recipe = gpu_recipe(tiny_gpt2, name="ddp", mixed_precision="auto")
    strategy = make_strategy(recipe, nccl_group)
    module = strategy.prepare(_load(tiny_gpt2), total_steps=2)
    out = module(input_ids=_batch(nccl_group))
    assert out.logits.dtype == torch.bfloat16  # auto picks bf16 on a GPU that has it
    assert {p.dtype for p in strategy.unwrapped().parameters()} == {torch.float32}


@pytest.mark.parametrize("offload", ["none", "all"])
def test_fsdp2_mixed_precision_and_cpu_offload(nccl_group, tiny_gpt2, tmp_path, offload):
    recipe = gpu_recipe(tiny_gpt2, name="fsdp", mixed_precision="bf16", offload=offload)
    result = train_save_reload(recipe, tiny_gpt2, nccl_group, tmp_path / "ckpt")
    assert_trained_and_reloaded(result)
    options = result["strategy"].shard_options()
    assert options["mp_policy"].param_dtype == torch.bfloat16
    assert ("offload_policy" in options) == (offload == "all")
    where = {p.to_local().device.type for p in result["strategy"].unwrapped().parameters()}
    assert where == ({"cpu"} if offload == "all" else {"cuda"})


@pytest.mark.parametrize(
    ("stage", "offload"), [(2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer")]
)
def test_deepspeed_zero_on_gpu(deepspeed_on_cuda, tiny_gpt2, tmp_path, stage, offload):
    recipe = gpu_recipe(
        tiny_gpt2,
        name="deepspeed",
        zero_stage=stage,
        offload=offload,
        mixed_precision="bf16",
    )
    result = train_save_reload(recipe, tiny_gpt2, deepspeed_on_cuda, tmp_path / "ckpt")
    assert_trained_and_reloaded(result, atol=0.1)
    optimizer = type(result["strategy"].engine.optimizer.optimizer).__name__
    # On the GPU DeepSpeed's own fused Adam runs; with offload its CPU Adam does.
    assert optimizer == ("DeepSpeedCPUAdam" if offload == "optimizer" else "FusedAdam")


def test_lora_trains_on_gpu_and_exports_a_merged_model(nccl_group, tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.export import export_trained_model
    from launcher.finetune import apply_finetune

    recipe = gpu_recipe(tiny_gpt2, method="lora", name="ddp", mixed_precision="bf16")
    strategy = make_strategy(recipe, nccl_group)
    module = strategy.prepare(apply_finetune(_load(tiny_gpt2), recipe), total_steps=STEPS)
    ids = _batch(nccl_group)
    losses = []
    for _ in range(STEPS):
        loss = module(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        losses.append(float(loss))
        strategy.step()
    assert losses[-1] < losses[0]
    trained = strategy.unwrapped()
    trained.eval()
    with torch.no_grad():
        before = trained(input_ids=ids).logits.float().cpu()
    info = export_trained_model(
        trained, recipe, tmp_path, AutoTokenizer.from_pretrained(tiny_gpt2), merge=True
    )
    assert info["merged"] and info["standalone"]
    exported = AutoModelForCausalLM.from_pretrained(info["model_dir"]).eval()
    with torch.no_grad():
        after = exported(input_ids=ids.cpu()).logits.float()
    assert (before - after).abs().max() < 0.05 * before.abs().max()


def test_qlora_trains_a_four_bit_base_on_gpu_and_exports_it_unquantized(
    nccl_group, tiny_llama, tmp_path
):
    pytest.importorskip(
        "bitsandbytes",
        reason="QLoRA needs bitsandbytes (43 MB wheel, not in the GPU kit: the image must have it)",
    )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.export import export_trained_model
    from launcher.finetune import apply_finetune, load_base_model

    recipe = gpu_recipe(tiny_llama, method="qlora", name="ddp", mixed_precision="bf16")
    strategy = make_strategy(recipe, nccl_group)
    model = apply_finetune(load_base_model(recipe, device=nccl_group), recipe)
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and all(m.weight.device.type == "cuda" for m in four_bit)
    assert {m.compute_dtype for m in four_bit} == {torch.bfloat16}
    module = strategy.prepare(model, total_steps=STEPS)
    ids = _batch(nccl_group)
    losses = []
    for _ in range(STEPS):
        loss = module(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        losses.append(float(loss))
        assert math.isfinite(strategy.step())
    assert losses[-1] < losses[0], losses
    trained = strategy.unwrapped().eval()
    with torch.no_grad():
        as_trained = module(input_ids=ids).logits.float().cpu()
    trained.save_pretrained(str(tmp_path / "live-adapter"))
    info = export_trained_model(
        trained, recipe, tmp_path, AutoTokenizer.from_pretrained(tiny_llama), merge=True
    )
    assert info["merged"] and info["standalone"]
    # The adapter on a fresh 4-bit base on the GPU runs exactly what trained.
    again = PeftModel.from_pretrained(
        load_base_model(recipe, device=nccl_group), str(tmp_path / "live-adapter")
    ).eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reloaded = again(input_ids=ids).logits.float().cpu()
    torch.testing.assert_close(reloaded, as_trained, atol=1e-2, rtol=1e-2)
    merged = AutoModelForCausalLM.from_pretrained(info["model_dir"]).eval()
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    with torch.no_grad():
        plain = merged(input_ids=ids.cpu()).logits.float()
    # bf16 compute and the base's 4-bit rounding separate the two.
    assert (plain - as_trained).abs().max() < 0.3 * as_trained.abs().max()


def test_use_gpu_auto_picks_the_gpu(ray_session):
    from launcher.raysession import use_gpu

    recipe = minimal_recipe()
    assert recipe.scaling.use_gpu == "auto"
    assert ray_session.cluster_resources().get("GPU", 0) >= 1
    assert use_gpu(recipe) is True

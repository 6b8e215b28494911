"""Memory per rank: ddp, fsdp and DeepSpeed ZeRO 1/2/3 on 2 gloo ranks, against ZeRO theory.

Two processes are spawned (as in tests/test_strategies.py); each builds the same GPT-2 through
launcher.strategies, trains 2 steps, and measures on its rank:
  parameters + optimizer  Strategy.local_state_bytes() (its local parameter shard, DeepSpeed's
                          fp32 partition, Adam moments; each storage counted once)
  gradients               right after the last backward of step 2, before the optimizer step:
                          every param.grad (local shard for FSDP) plus the gradient buffers the
                          ZeRO optimizer keeps (attributes named *grad*), storages not already
                          counted as parameters or optimizer state

Theory, fp32 training with Adam (2 moments), Psi parameters, N = 2 ranks, bytes per rank:
  ddp        params 4Psi   + grads 4Psi   + optimizer 8Psi                      = 16 Psi
  fsdp       params 4Psi/N + grads 4Psi/N + optimizer 8Psi/N                    = 16 Psi / N
  zero-1     params 4Psi   + grads 4Psi   + optimizer (4 fp32 copy + 8) Psi/N
  zero-2     params 4Psi   + grads 4Psi/N + optimizer 12 Psi/N
  zero-3     params 4Psi/N + grads 4Psi/N + optimizer 12 Psi/N
(DeepSpeed keeps an fp32 master partition even in fp32 training: the 4 in its 12.)
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

STRATEGIES = [
    ("ddp", {"name": "ddp"}),
    ("fsdp", {"name": "fsdp"}),
    ("zero-1", {"name": "deepspeed", "zero_stage": 1}),
    ("zero-2", {"name": "deepspeed", "zero_stage": 2}),
    ("zero-3", {"name": "deepspeed", "zero_stage": 3}),
]
WORLD = 2
STEPS = 2
BATCH = 4
SEQ = 32


def theory_bytes(name: str, psi: int, world: int = WORLD) -> dict[str, float]:
    """Per-rank parameter, gradient and optimizer bytes the ZeRO paper's accounting predicts
    for fp32 weights and Adam."""
    n = world
    table = {
        "ddp": (4 * psi, 4 * psi, 8 * psi),
        "fsdp": (4 * psi / n, 4 * psi / n, 8 * psi / n),
        "zero-1": (4 * psi, 4 * psi, 12 * psi / n),
        "zero-2": (4 * psi, 4 * psi / n, 12 * psi / n),
        "zero-3": (4 * psi / n, 4 * psi / n, 12 * psi / n),
    }
    params, grads, optim = table[name]
    return {"params": params, "grads": grads, "optimizer": optim}


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    if local.device.type == "meta" or local.numel() == 0:
        return None
    storage = local.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _tensors_in(value: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 2:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors_in(v, depth + 1)]
    return []


def state_storages(strategy) -> set[int]:
    """Storage pointers of parameters and optimizer state (what local_state_bytes counts)."""
    module = strategy.unwrapped()
    optimizer = getattr(strategy, "engine", None)
    optimizer = optimizer.basic_optimizer if optimizer is not None else strategy.optimizer
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    for group in optimizer.param_groups:
        tensors.extend(group["params"])
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return {key[0] for t in tensors if (key := _storage_key(t))}


def gradient_bytes(strategy) -> tuple[int, list[str]]:
    """Bytes of gradient storage this rank holds now, and where they were found."""
    exclude = state_storages(strategy)
    found: dict[int, int] = {}
    where: set[str] = set()

    def add(tensor: torch.Tensor, name: str) -> None:
        key = _storage_key(tensor)
        if key and key[0] not in exclude:
            found[key[0]] = max(found.get(key[0], 0), key[1])
            where.add(name)

    for param in strategy.unwrapped().parameters():
        if param.grad is not None:
            add(param.grad, "param.grad")
    engine = getattr(strategy, "engine", None)
    if engine is not None:
        zero = engine.optimizer
        for attr, value in vars(zero).items():
            if "grad" in attr.lower() or attr.startswith("ipg"):
                for tensor in _tensors_in(value):
                    add(tensor, f"optimizer.{attr}")
    return sum(found.values()), sorted(where)


def _train_and_measure(name: str, strategy_cfg: dict, model_dir: str, rank: int) -> dict:
    from transformers import AutoModelForCausalLM

    from launcher.recipe import Recipe
    from launcher.strategies import make_strategy

    recipe = Recipe(
        name="bench-memory",
        model={"name_or_path": model_dir},
        data={"train": "unused.jsonl"},
        train={"batch_size": BATCH, "lr": 1e-3, "max_grad_norm": 1.0},
        strategy={**strategy_cfg, "mixed_precision": "no"},
    )
    strategy = make_strategy(recipe, "cpu")
    torch.manual_seed(0)
    model = strategy.build(lambda: AutoModelForCausalLM.from_pretrained(model_dir))
    module = strategy.prepare(model, total_steps=STEPS)
    psi = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(rank)
    grads, where = 0, []
    for _ in range(STEPS):
        ids = torch.randint(0, 400, (BATCH, SEQ), generator=generator)
        strategy.backward(module(input_ids=ids, labels=ids).loss)
        grads, where = gradient_bytes(strategy)
        strategy.step()
    state = strategy.local_state_bytes()
    return {"psi": int(psi), "state_bytes": state, "grad_bytes": grads, "grads_found_in": where}


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name, cfg in STRATEGIES:
            results[name] = _train_and_measure(name, cfg, model_dir, rank)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_memory(model_dir: Path, work: Path) -> dict[str, Any]:
    """Spawn the 2 ranks, then compare each strategy's measured bytes with theory."""
    import torch.multiprocessing as mp

    work.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _worker,
        args=(_free_port(), str(model_dir), str(work)),
        nprocs=WORLD,
        start_method="spawn",
    )
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(WORLD)]
    out: dict[str, Any] = {"world_size": WORLD, "strategies": {}}
    ddp_total = None
    for name, _ in STRATEGIES:
        psi = ranks[0][name]["psi"]
        theory = theory_bytes(name, psi)
        theory_state = theory["params"] + theory["optimizer"]
        per_rank = []
        for r in range(WORLD):
            got = ranks[r][name]
            total = got["state_bytes"] + got["grad_bytes"]
            per_rank.append(
                {
                    "params_plus_optimizer_bytes": got["state_bytes"],
                    "grad_bytes": got["grad_bytes"],
                    "total_bytes": total,
                    "grads_found_in": got["grads_found_in"],
                }
            )
        measured = max(r["total_bytes"] for r in per_rank)
        ddp_total = measured if name == "ddp" else ddp_total
        out["strategies"][name] = {
            "psi": psi,
            "theory_bytes": {**theory, "total": sum(theory.values())},
            "measured_max_rank_bytes": measured,
            "ratio_to_theory": measured / sum(theory.values()),
            "state_ratio_to_theory": max(r["params_plus_optimizer_bytes"] for r in per_rank)
            / theory_state,
            "grad_ratio_to_theory": max(r["grad_bytes"] for r in per_rank) / theory["grads"],
            "fraction_of_ddp": measured / ddp_total if ddp_total else None,
            "ranks": per_rank,
        }
    return out

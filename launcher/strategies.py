"""Distributed strategies: how the model lives across workers (ddp, fsdp, deepspeed).

Every strategy offers the same small interface (`Strategy`) so the training loop never asks which
one runs: build the model, prepare it (wrap, optimizer, schedule), run backward per micro-batch,
step, save and load sharded checkpoints. `consolidate` turns a checkpoint directory back into one
full fp32 state dict in a plain process, without a process group.

Checkpoint layout written by `save` (inside the directory the training loop reports):

    strategy.json          {"strategy", "world_size", ...}: written by rank 0
    ddp:       model.pt, optimizer.pt, schedule.pt      (rank 0; replicas are identical)
    fsdp:      dcp/ (torch.distributed.checkpoint: each rank writes its own shard files),
               schedule.pt
    deepspeed: ds/ (DeepSpeed save_checkpoint: each rank writes its own ZeRO partition),
               schedule.pt
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from launcher.recipe import Recipe, TrainConfig

STRATEGY_FILE = "strategy.json"
SCHEDULE_FILE = "schedule.pt"


class Strategy(Protocol):
    """What the training loop calls; the same for ddp, fsdp and deepspeed."""

    name: str

    def build(self, build_model: Callable[[], nn.Module]) -> nn.Module: ...
    def prepare(self, model: nn.Module, total_steps: int) -> nn.Module: ...
    def no_sync(self, active: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> float: ...
    def lr(self) -> float: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def unwrapped(self) -> nn.Module: ...


# ------------------------------------------------------------------------- shared helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm weights (all 1-d tensors) are not decayed: decay would pull them to 0."""
    return param.ndim < 2 or name.endswith(".bias")


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and a non-decayed group (in module order)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, no weight decay on biases and norm weights."""
    groups = optimizer_groups(model, train_cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (check finetune.method)")
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=1e-8)


def warmup_steps(train_cfg: TrainConfig, total_steps: int) -> int:
    """Optimizer steps spent warming up: warmup_ratio of the run, rounded up."""
    return math.ceil(train_cfg.warmup_ratio * total_steps)


def lr_factor(step: int, scheduler: str, warmup: int, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (0-based, as LambdaLR counts)."""
    if step < warmup:
        return step / warmup
    if scheduler == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_schedule(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then linear / cosine decay to 0, or constant."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive (got {total_steps})")
    warmup = warmup_steps(train_cfg, total_steps)
    scheduler = train_cfg.scheduler

    def factor(step: int) -> float:
        return lr_factor(step, scheduler, warmup, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_precision(recipe: Recipe, device: torch.device | str) -> torch.dtype | None:
    """The compute dtype of mixed precision, or None for plain fp32.

    auto: bf16 on GPUs that support it (fp32 elsewhere, CPU included). An explicit bf16 is honoured
    on CPU too; fp16 needs a GPU (validation refuses it on CPU, this re-checks at run time).
    """
    device = torch.device(device)
    choice = recipe.strategy.mixed_precision
    if choice == "no":
        return None
    if choice == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("strategy.mixed_precision: fp16 needs a GPU; use no or bf16 on CPU")
    return torch.bfloat16 if choice == "bf16" else torch.float16


def clip_value(train_cfg: TrainConfig) -> float:
    """The clipping threshold; inf keeps the norm computation but never clips."""
    return train_cfg.max_grad_norm if train_cfg.max_grad_norm is not None else math.inf


def _write_strategy_file(directory: Path, name: str, **extra: Any) -> None:
    if _rank() == 0:
        info = {"strategy": name, "world_size": _world_size(), **extra}
        (directory / STRATEGY_FILE).write_text(json.dumps(info, indent=2))


def read_strategy_file(directory: Path) -> dict[str, Any]:
    """What `save` recorded about the run that wrote this checkpoint."""
    path = Path(directory) / STRATEGY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a strategy checkpoint (no {STRATEGY_FILE})")
    return json.loads(path.read_text())


def _check_strategy(directory: Path, expected: str) -> dict[str, Any]:
    info = read_strategy_file(directory)
    if info["strategy"] != expected:
        raise ValueError(
            f"{directory}: checkpoint was written by strategy {info['strategy']!r}, "
            f"cannot load it with {expected!r}"
        )
    return info


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies; floating tensors as fp32 (integer buffers keep their dtype)."""
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        out[key] = value.float() if value.is_floating_point() else value
    return out


class _Autocast(nn.Module):
    """Runs the wrapped module's forward under torch.autocast (DDP mixed precision)."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


# ------------------------------------------------------------------------------------ DDP


class DDPStrategy:
    """Data parallel: a full replica per worker, gradients averaged by all-reduce.

    Plain torch DistributedDataParallel rather than `ray.train.torch.prepare_model`: the process
    group is the one Ray Train set up either way, but plain DDP behaves identically inside or
    outside Ray (tests spawn bare processes), exposes `no_sync` directly, and leaves the device
    placement to us, as the other strategies do.
    """

    name = "ddp"

    def __init__(self, recipe: Recipe, device: torch.device):
        self.recipe = recipe
        self.train_cfg = recipe.train
        self.device = torch.device(device)
        self.dtype = resolve_precision(recipe, self.device)
        self.model: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None

    def build(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        return build_model()

    def prepare(self, model: nn.Module, total_steps: int) -> nn.Module:
        self.model = model.to(self.device)
        wrapped: nn.Module = model
        if _world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.ddp = wrapped
        if self.dtype is not None:
            wrapped = _Autocast(wrapped, self.device.type, self.dtype)
        if self.dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.wrapped = wrapped
        self.optimizer = build_optimizer(model, self.train_cfg)
        self.schedule = build_schedule(self.optimizer, self.train_cfg, total_steps)
        return wrapped

    def no_sync(self, active: bool) -> contextlib.AbstractContextManager:
        if active and isinstance(self.ddp, nn.parallel.DistributedDataParallel):
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.train_cfg.grad_accum
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> float:
        assert self.optimizer is not None and self.schedule is not None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_value(self.train_cfg))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if _rank() == 0:
            # Replicas are identical, so rank 0 alone writes model and optimizer.
            torch.save(self.model.state_dict(), directory / "model.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.schedule.state_dict(), directory / SCHEDULE_FILE)
        _write_strategy_file(directory, self.name)
        _barrier()

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        _check_strategy(directory, self.name)
        state = torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state)
        optim_state = torch.load(
            directory / "optimizer.pt", map_location=self.device, weights_only=True
        )
        self.optimizer.load_state_dict(optim_state)
        self.schedule.load_state_dict(torch.load(directory / SCHEDULE_FILE, weights_only=True))

    def unwrapped(self) -> nn.Module:
        return self.model


def _consolidate_ddp(directory: Path) -> dict[str, torch.Tensor]:
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    return _fp32_cpu(state)


# -------------------------------------------------------------------------------- factory


STRATEGIES: dict[str, Callable[[Recipe, torch.device], Strategy]] = {
    "ddp": DDPStrategy,
}

CONSOLIDATORS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "ddp": _consolidate_ddp,
}


def make_strategy(recipe: Recipe, device: torch.device | str) -> Strategy:
    """The strategy object for `recipe.strategy.name` on this worker's device."""
    name = recipe.strategy.name
    if name not in STRATEGIES:
        raise ValueError(
            f"strategy.name: {name!r} is not available; choose one of {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[name](recipe, torch.device(device))


def consolidate(strategy_name: str, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (unwrapped key names) from a checkpoint, in a plain process."""
    checkpoint_dir = Path(checkpoint_dir)
    if strategy_name not in CONSOLIDATORS:
        raise ValueError(
            f"cannot consolidate strategy {strategy_name!r}; known: {', '.join(CONSOLIDATORS)}"
        )
    _check_strategy(checkpoint_dir, strategy_name)
    return CONSOLIDATORS[strategy_name](checkpoint_dir)

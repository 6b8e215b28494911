"""Distributed strategies: how the model lives across workers (ddp, fsdp, deepspeed).

Every strategy offers the same small interface (`Strategy`) so the training loop never asks which
one runs: build the model, prepare it (wrap, optimizer, schedule), run backward per micro-batch,
step, save and load sharded checkpoints. launcher.export turns a checkpoint directory back into
one full fp32 state dict in a plain process, without a process group.

Checkpoint layout written by `save` (inside the directory the training loop reports):

    strategy.json          {"strategy", "world_size", ...}: written by rank 0
    ddp:       model.pt, optimizer.pt, schedule.pt      (rank 0; replicas are identical)
    fsdp:      dcp/ (torch.distributed.checkpoint: each rank writes its own shard files),
               schedule.pt
    deepspeed: ds/state/ (DeepSpeed save_checkpoint: each rank writes its own ZeRO partition;
               the schedule is saved inside DeepSpeed's model states); qlora: model.pt,
               optimizer.pt, schedule.pt of the LoRA weights gathered whole (rank 0)

Resuming with a different number of workers keeps everything that matters for the run to go on
as it would have: weights, AdamW moments and step counts, and the schedule position. ddp: the
replica files do not depend on the world size. fsdp: torch.distributed.checkpoint reshards
parameters and optimizer state to the new layout on load. deepspeed: each rank converts the
checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and moments) in a temporary
directory and loads it into the new partitioning. Not kept: the data order within an epoch (each
worker's shard changes with the worker count); fp16 runs (GPUs only) may restart the dynamic loss
scale from its initial value.
A checkpoint is only loaded by the strategy that wrote it (strategy.json records which).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from launcher.deepspeed_config import deepspeed_config, mixed_precision_name
from launcher.models import check_trainable_keys, load_trainable_state, trainable_state
from launcher.recipe import Recipe, TrainConfig
from launcher.sharded_load import (
    block_modules,
    build_partitioned,
    import_deepspeed,
    load_gathered_trainable,
    process_rank,
    save_gathered_trainable,
    settle_loaded_four_bit,
    shard_and_load,
    shard_loaded,
    whole_on_first_rank,
)

STRATEGY_FILE = "strategy.json"
SCHEDULE_FILE = "schedule.pt"
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    def local_state_bytes(self) -> int: ...


# ------------------------------------------------------------------------- shared helpers


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
    """Optimizer steps spent warming up: train.warmup_steps when given (at most the whole run),
    else warmup_ratio of the run, rounded up."""
    if train_cfg.warmup_steps is not None:
        return min(train_cfg.warmup_steps, total_steps)
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
    name = mixed_precision_name(
        recipe.strategy.mixed_precision, device.type, torch.cuda.is_bf16_supported
    )
    return PRECISION_DTYPES.get(name)


def clip_value(train_cfg: TrainConfig) -> float:
    """The clipping threshold; inf keeps the norm computation but never clips."""
    return train_cfg.max_grad_norm if train_cfg.max_grad_norm is not None else math.inf


def clip_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    train_cfg: TrainConfig,
    scaler: Any = None,
) -> float:
    """Clip the gradients' global norm, step optimizer and schedule, clear the gradients;
    returns the norm before clipping (a DTensor norm under FSDP is made whole first)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_value(train_cfg))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _write_strategy_file(directory: Path, name: str, **extra: Any) -> None:
    if process_rank() == 0:
        info = {"strategy": name, "world_size": _world_size(), **extra}
        (directory / STRATEGY_FILE).write_text(json.dumps(info, indent=2))


def read_strategy_file(directory: Path) -> dict[str, Any]:
    """What `save` recorded about the run that wrote this checkpoint."""
    path = Path(directory) / STRATEGY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a strategy checkpoint (no {STRATEGY_FILE})")
    return json.loads(path.read_text())


def check_strategy_file(directory: Path, expected: str) -> dict[str, Any]:
    """The checkpoint's strategy.json; ValueError unless strategy `expected` wrote it."""
    info = read_strategy_file(directory)
    if info["strategy"] != expected:
        raise ValueError(
            f"{directory}: checkpoint was written by strategy {info['strategy']!r}, "
            f"cannot load it with {expected!r}"
        )
    return info


def local_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds for parameters and optimizer state (each storage counted once).

    Counts the module's parameters (their local shard under FSDP, the ZeRO-3 partition under
    DeepSpeed), the tensors the inner optimizer updates (DeepSpeed's fp32 partitions) and its
    state (Adam moments). Gradients and activations are not counted.
    """
    tensors: list[torch.Tensor] = []
    for param in module.parameters():
        tensors.append(getattr(param, "ds_tensor", param))
    for group in optimizer.param_groups:
        tensors.extend(group["params"])
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
    seen: dict[int, int] = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def resident_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank really holds, each storage counted once: meta
    tensors and checkpoint placeholders hold (next to) none, ZeRO-3 its partition."""
    seen: dict[int, int] = {}
    for param in module.parameters():
        local = getattr(param, "ds_tensor", param)
        local = local.to_local() if hasattr(local, "to_local") else local
        if local.device.type != "meta":
            storage = local.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


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
        if self.recipe.strategy.activation_checkpointing:
            enable_activation_checkpointing(model)
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
        return clip_and_step(
            self.model, self.optimizer, self.schedule, self.train_cfg, scaler=self.scaler
        )

    def lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if process_rank() == 0:
            # Replicas are identical, so rank 0 alone writes model and optimizer.
            torch.save(self._model_state(), directory / "model.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.schedule.state_dict(), directory / SCHEDULE_FILE)
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), directory / "scaler.pt")
        _write_strategy_file(directory, self.name)
        _barrier()

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        check_strategy_file(directory, self.name)
        if self.scaler is not None and (directory / "scaler.pt").exists():
            self.scaler.load_state_dict(torch.load(directory / "scaler.pt", weights_only=True))
        state = torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        if frozen_base(self.recipe):
            load_trainable_state(self.model, state)
        else:
            self.model.load_state_dict(state)
        optim_state = torch.load(
            directory / "optimizer.pt", map_location=self.device, weights_only=True
        )
        self.optimizer.load_state_dict(optim_state)
        self.schedule.load_state_dict(torch.load(directory / SCHEDULE_FILE, weights_only=True))

    def _model_state(self) -> dict[str, torch.Tensor]:
        if frozen_base(self.recipe):
            return trainable_state(self.model)
        return self.model.state_dict()

    def unwrapped(self) -> nn.Module:
        return self.model

    def local_state_bytes(self) -> int:
        return local_state_bytes(self.model, self.optimizer)


def frozen_base(recipe: Recipe) -> bool:
    """qlora: the 4-bit base never changes and is quantized alike from the base checkpoint
    on every load, so checkpoints hold only what trains (the LoRA weights)."""
    return recipe.finetune.method == "qlora"


# ----------------------------------------------------------------------------------- FSDP


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant, key names unchanged)."""
    target = model
    while not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "base_model"):
        target = target.base_model
    if hasattr(target, "gradient_checkpointing_enable"):
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed._composable import checkpoint

    for block in block_modules(model):
        checkpoint(block)


class FSDPStrategy:
    """FSDP2: each transformer block and then the root sharded with `fully_shard`.

    Start-up memory: the model is built with its checkpoint weights as placeholders and each
    rank reads only its own shard of them (`shard_and_load`), so no rank holds the full model.
    """

    name = "fsdp"

    def __init__(self, recipe: Recipe, device: torch.device):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("strategy fsdp needs an initialised torch.distributed process group")
        self.recipe = recipe
        self.train_cfg = recipe.train
        self.device = torch.device(device)
        self.dtype = resolve_precision(recipe, self.device)
        self.offload = recipe.strategy.offload == "all"
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: torch.optim.lr_scheduler.LambdaLR | None = None

    def build(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        from launcher.models import deferred_checkpoint_weights

        with deferred_checkpoint_weights(whole_load=whole_on_first_rank):
            return build_model()

    def shard_options(self, reduce_dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
        """fully_shard keyword arguments: the mesh over all ranks, mixed precision, offload."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        options: dict[str, Any] = {"mesh": init_device_mesh(self.device.type, (_world_size(),))}
        if self.dtype is not None:
            # Gradients are reduced in fp32 so the average is as exact as in ddp.
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=self.dtype, reduce_dtype=reduce_dtype
            )
        if self.offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        return options

    def prepare(self, model: nn.Module, total_steps: int) -> nn.Module:
        if self.recipe.strategy.activation_checkpointing:
            enable_activation_checkpointing(model)
        if frozen_base(self.recipe):
            shard_loaded(model, self.shard_options())
        else:
            shard_and_load(model, self.device, self.shard_options())
        self.model = model
        self.optimizer = build_optimizer(model, self.train_cfg)
        self.schedule = build_schedule(self.optimizer, self.train_cfg, total_steps)
        return model

    @contextlib.contextmanager
    def no_sync(self, active: bool) -> Iterator[None]:
        if not active:
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.train_cfg.grad_accum).backward()

    def step(self) -> float:
        return clip_and_step(self.model, self.optimizer, self.schedule, self.train_cfg)

    def lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        frozen = frozen_base(self.recipe)
        model_state, optim_state = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=frozen)
        )
        if frozen:
            # The 4-bit layers add their quantization state (scales, code book) to the state
            # dict under names that are no parameters; it is rebuilt with the base.
            trainable = trainable_state(self.model)
            model_state = {k: v for k, v in model_state.items() if k in trainable}
        return {"model": model_state, "optim": optim_state}

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR))
        if process_rank() == 0:
            torch.save(self.schedule.state_dict(), directory / SCHEDULE_FILE)
        _write_strategy_file(directory, self.name)
        _barrier()

    def load(self, directory: Path) -> None:
        """Any world size: DCP reshards parameters and optimizer state to the current layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        directory = Path(directory)
        check_strategy_file(directory, self.name)
        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        frozen = frozen_base(self.recipe)
        if frozen:
            check_trainable_keys(self.model, state["model"])
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=frozen, strict=not frozen),
        )
        self.schedule.load_state_dict(torch.load(directory / SCHEDULE_FILE, weights_only=True))

    def unwrapped(self) -> nn.Module:
        # fully_shard changes the module in place and keeps its parameter names.
        return self.model

    def local_state_bytes(self) -> int:
        return local_state_bytes(self.model, self.optimizer)


DCP_DIR = "dcp"


# ------------------------------------------------------------------------------ DeepSpeed


class DeepSpeedStrategy:
    """DeepSpeed ZeRO 0-3 with optional CPU offload; works with gloo on CPU and NCCL on GPUs."""

    name = "deepspeed"

    def __init__(self, recipe: Recipe, device: torch.device):
        self.recipe = recipe
        self.train_cfg = recipe.train
        self.device = torch.device(device)
        self.config = deepspeed_config(recipe, _world_size(), self.device)
        self.stage = recipe.strategy.zero_stage
        self.engine: Any = None
        self.model: nn.Module | None = None
        self._hf_config: Any = None
        self._micro = 0

    def build(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        if self.stage != 3:
            return build_model()
        from transformers.integrations import HfDeepSpeedConfig

        # A 4-bit base cannot be read in parts: each rank loads it whole (before the config
        # below, which makes from_pretrained load under zero.Init); deepspeed.initialize
        # partitions it (its packed weights are stored in the compute dtype: models.FourBit).
        model = build_model() if frozen_base(self.recipe) else None
        # Kept alive for the whole run: from_pretrained (and generate) look it up through a
        # weak reference to know that parameters are partitioned.
        self._hf_config = HfDeepSpeedConfig(self.config)
        return model if model is not None else build_partitioned(build_model, self.config)

    def prepare(self, model: nn.Module, total_steps: int) -> nn.Module:
        deepspeed = import_deepspeed()

        if self.recipe.strategy.activation_checkpointing:
            enable_activation_checkpointing(model)
        if frozen_base(self.recipe):
            settle_loaded_four_bit(model)
        self.model = model
        train_cfg = self.train_cfg

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return build_schedule(optimizer, train_cfg, total_steps)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=optimizer_groups(model, train_cfg.weight_decay),
            lr_scheduler=schedule,
            config=self.config,
            dist_init_required=False,
        )
        return self.engine

    def no_sync(self, active: bool) -> contextlib.AbstractContextManager:
        # The engine skips gradient reduction itself until the accumulation boundary.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps
        self._micro += 1
        if self._micro % self.train_cfg.grad_accum:
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"step() after {self._micro % self.train_cfg.grad_accum} backward() calls; "
                f"deepspeed steps after exactly train.grad_accum={self.train_cfg.grad_accum}"
            )
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if frozen_base(self.recipe):
            # Only the small LoRA weights change: gathered whole, any world size loads them.
            save_gathered_trainable(self.engine, directory)
            info = {"trainable_only": True}
        else:
            self.engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG)
            info = {"tag": DS_TAG}
        _write_strategy_file(directory, self.name, zero_stage=self.stage, micro=self._micro, **info)
        _barrier()

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        info = check_strategy_file(directory, self.name)
        same_stage = info.get("zero_stage") == self.stage
        if frozen_base(self.recipe):
            load_gathered_trainable(self.engine, directory)
        # ZeRO-0 partitions nothing: its files are the same at every world size (and the
        # universal conversion, which reads ZeRO partitions, finds none to read).
        elif same_stage and (info["world_size"] == _world_size() or self.stage == 0):
            self.engine.load_checkpoint(str(directory / DS_DIR), tag=info["tag"])
        else:
            self._load_resharded(directory, info)
        self._micro = int(info.get("micro", 0))

    def _load_resharded(self, directory: Path, info: dict[str, Any]) -> None:
        """Another world size or stage: through DeepSpeed's universal checkpoint format.

        Each rank converts the checkpoint into its own temporary directory (ranks may be on
        different nodes), then loads the parameters, Adam moments and schedule from it.
        """
        import argparse
        import io
        import tempfile

        from deepspeed.checkpoint import ds_to_universal

        with tempfile.TemporaryDirectory(prefix="ftlaunch-universal-") as tmp:
            args = argparse.Namespace(
                input_folder=str(directory / DS_DIR / info["tag"]),
                output_folder=str(Path(tmp) / info["tag"]),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
            with contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(args)
            config = self.engine._config
            config.load_universal_checkpoint = True
            try:
                self.engine.load_checkpoint(tmp, tag=info["tag"])
            finally:
                config.load_universal_checkpoint = False

    def unwrapped(self) -> nn.Module:
        return self.engine.module if self.engine is not None else self.model

    def local_state_bytes(self) -> int:
        return local_state_bytes(self.engine.module, self.engine.basic_optimizer)


DS_DIR = "ds"
DS_TAG = "state"


# -------------------------------------------------------------------------------- factory


STRATEGIES: dict[str, Callable[[Recipe, torch.device], Strategy]] = {
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def make_strategy(recipe: Recipe, device: torch.device | str) -> Strategy:
    """The strategy object for `recipe.strategy.name` on this worker's device."""
    name = recipe.strategy.name
    if name not in STRATEGIES:
        raise ValueError(
            f"strategy.name: {name!r} is not available; choose one of {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[name](recipe, torch.device(device))

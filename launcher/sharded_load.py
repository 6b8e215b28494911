"""Loading a checkpoint straight into shards, so no worker ever holds the whole model.

FSDP2 (`shard_and_load`): the model is built with placeholders for the weights the safetensors
files hold, fully_shard'ed block by block, and each rank then reads only the rows of its own
dim-0 shards. ZeRO-3 (`build_partitioned`): the model is partitioned module by module, each
module's weights read just before it is partitioned. Checkpoints that cannot be read in parts
(GGUF, .bin, quantized, remote code) are loaded whole, by rank 0 only (FSDP) or under zero.Init.
A 4-bit base cannot be read in parts either: every rank loads and quantizes it whole, then
FSDP2 shards it (`shard_loaded`) or deepspeed.initialize partitions it (ZeRO-3). Its trainable
(LoRA) weights and their Adam state are checkpointed whole (`gather_trainable_state`), which any
world size loads back into its own partitions (`save_gathered_trainable`,
`load_gathered_trainable`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.models import (
    BlocksNotFoundError,
    check_trainable_keys,
    checkpoint_sources,
    deferred_checkpoint_weights,
    replace_tensors,
    transformer_blocks,
)


def process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (e.g. GPT2Block, LlamaDecoderLayer) that fully_shard and activation
    checkpointing wrap one by one; none for a model without a block list (the root alone)."""
    try:
        return list(transformer_blocks(model)[1])
    except BlocksNotFoundError:
        return []


def shard_and_load(model: nn.Module, device: torch.device, options: dict[str, Any]) -> None:
    """fully_shard each transformer block and then the root, and give every rank its shards.

    The model comes from a builder run under `deferred_checkpoint_weights`: weights the
    checkpoint holds are placeholders, and each rank reads only its own rows of them from the
    safetensors files once sharded, so no rank ever holds the whole model. What the checkpoint
    lacks (new heads, adapters, buffers) is small, real on every rank, and taken from rank 0 so
    all ranks agree. A checkpoint that cannot be read lazily (GGUF, .bin) is loaded whole by
    rank 0 (the other ranks build on meta) and sent out the same way.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    sources = checkpoint_sources(model)
    state = model.state_dict(keep_vars=True)
    held = (
        {n: t.detach() for n, t in state.items() if n not in sources} if process_rank() == 0 else {}
    )
    buffers = {
        n: b.detach().clone()
        for n, b in model.named_buffers()
        if n not in sources and not b.is_meta
    }
    _placeholders_to_meta(model, {id(state[n]) for n in sources})
    for block in block_modules(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    offload = "offload_policy" in options
    model.to_empty(device="cpu" if offload else device)
    if offload:
        # Parameters live on the CPU, buffers on the compute device (where fully_shard put them).
        _buffers_to(model, device)
    read_checkpoint_shards(model, sources)
    set_model_state_dict(
        model,
        held,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
    )
    del held
    for name, buffer in model.named_buffers():
        # Non-persistent buffers (e.g. rotary frequencies) are in no state dict.
        if name in buffers:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer.data, src=0)


def shard_loaded(model: nn.Module, options: dict[str, Any]) -> None:
    """fully_shard each transformer block and then the root of a model every rank loaded whole
    and identically (a 4-bit base: each rank quantizes the same checkpoint alike, which cannot
    be done in parts). The trainable weights are taken from rank 0 so all ranks agree.

    The packed 4-bit weights must be stored in the dtype fully_shard gathers parameters in
    (see launcher.models.FourBit); their quantization state (scales, code book) is small, stays
    whole on every rank with its Linear4bit module, and bitsandbytes takes it from the module
    when the weight it finds is the plain gathered tensor.
    """
    from torch.distributed.fsdp import fully_shard

    settle_loaded_four_bit(model)
    for block in block_modules(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


def settle_loaded_four_bit(model: nn.Module) -> None:
    """Before a 4-bit model every rank loaded whole is sharded (FSDP2) or partitioned (ZeRO-3):
    the trainable weights are taken from rank 0 so all ranks agree. (No 4-bit layer rewrites
    its weight in place, which a sharded weight, gathered anew for each forward, could not
    survive: launcher.models.load_four_bit_model switches that off at load.)"""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and dist.is_available() and dist.is_initialized():
                dist.broadcast(param.data, src=0)


def _buffers_to(model: nn.Module, device: torch.device | str) -> None:
    """Move every buffer to `device` (shared buffers stay shared)."""
    ids = {id(b) for b in model.buffers() if b.device != torch.device(device)}
    replace_tensors(model, ids, lambda t: t.to(device))


@contextlib.contextmanager
def whole_on_first_rank() -> Iterator[None]:
    """A checkpoint that cannot be read lazily: rank 0 loads it; the others build the model
    with meta parameters (they still open the checkpoint, and dequantize a GGUF file, but keep
    none of its weights) and receive their shards from rank 0."""
    if process_rank() == 0:
        yield
        return
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def _placeholders_to_meta(model: nn.Module, ids: set[int]) -> None:
    """Swap checkpoint placeholders for meta tensors (tied ones stay tied) before sharding, so
    fully_shard allocates nothing for them until `to_empty`."""
    replace_tensors(model, ids, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))


def read_checkpoint_shards(model: nn.Module, sources: dict[str, tuple[str, str]]) -> None:
    """Copy into each tensor the part of its checkpoint value this rank holds: the rows of its
    dim-0 shard for FSDP parameters, all of it for replicated tensors."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with contextlib.ExitStack() as stack, torch.no_grad():
        handle = _checkpoint_handles(stack)
        for name, (file, key) in sources.items():
            if name not in tensors:  # tied duplicates appear once among the module's tensors
                continue
            local, rows = _local_rows(tensors[name])
            if local.numel() == 0:
                continue
            part = handle(file)
            local.copy_(part.get_slice(key)[rows] if local.ndim else part.get_tensor(key))


def _checkpoint_handles(stack: contextlib.ExitStack) -> Callable[[str], Any]:
    """A safetensors handle per file, opened on first use and closed with `stack`. pread
    instead of mmap keeps the bytes a rank does not read out of its process."""
    from safetensors import safe_open

    handles: dict[str, Any] = {}

    def handle(file: str) -> Any:
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="pt", backend="pread"))
        return handles[file]

    return handle


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """This rank's local tensor and which rows of the full tensor it holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor.data, slice(None)
    if len(tensor.placements) != 1 or tensor.placements[0] != Shard(0):
        raise ValueError(f"expected a dim-0 shard on a 1-D mesh, got {tensor.placements}")
    local = tensor.to_local()
    rows = tensor.shape[0]
    chunk = math.ceil(rows / tensor.device_mesh.size())
    start = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise ValueError(f"shard of {local.shape[0]} rows, expected rows {start}:{stop}")
    return local, slice(start, stop)


def import_deepspeed() -> Any:
    """The deepspeed module, with its shared-memory collective op turned off.

    DeepSpeed builds that C++ op when its communication starts (a compile of about a minute on
    a CPU machine, the first time; a failure where no compiler is installed) but uses it only
    for inference all-reduce (tensor-parallel inference), which training never calls: the
    collectives of a ZeRO step go through torch.distributed.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _attach_deepspeed_comm() -> None:
    """Point deepspeed.comm at the process group Ray Train (or the caller) already set up.

    zero.Init asks deepspeed.comm for the world size before deepspeed.initialize runs; left
    uninitialised it answers 1 and the batch-size check fails.
    """
    deepspeed = import_deepspeed()

    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def build_partitioned(build_model: Callable[[], nn.Module], config: dict[str, Any]) -> nn.Module:
    """ZeRO-3: build with checkpoint placeholders, then partition the model module by module,
    each module's weights read from the safetensors files just before it is partitioned, so a
    rank holds its partition plus at most one module's full weights. What the checkpoint lacks
    (heads, adapters) is partitioned as built. A checkpoint that cannot be read lazily is
    loaded under zero.Init, which partitions it as it loads."""
    deepspeed = import_deepspeed()

    _attach_deepspeed_comm()
    # zero.Init patches tensor constructors; torch._dynamo imported lazily inside it then
    # fails its signature checks, so import it before.
    import torch._dynamo  # noqa: F401

    with deferred_checkpoint_weights(
        whole_load=lambda: deepspeed.zero.Init(config_dict_or_path=config)
    ):
        model = build_model()
    sources = checkpoint_sources(model)
    state = model.state_dict(keep_vars=True)
    by_tensor = {id(state[name]): where for name, where in sources.items()}
    with contextlib.ExitStack() as stack:
        handle = _checkpoint_handles(stack)

        def read(where: tuple[str, str]) -> torch.Tensor:
            return handle(where[0]).get_tensor(where[1])

        for module in _children_first(model):
            own = [
                t
                for table in (module._parameters, module._buffers)
                for t in table.values()
                if t is not None and id(t) in by_tensor
            ]
            if not own:
                continue
            for tensor in own:
                value = read(by_tensor.pop(id(tensor)))
                if isinstance(tensor, nn.Parameter):
                    tensor.data = value.to(_zero_dtype(config, tensor.dtype))  # ties hold
                else:
                    replace_tensors(model, {id(tensor)}, lambda _, v=value.to(tensor.dtype): v)
            _cast_parameters(module, config)
            deepspeed.zero.Init(module=module, config_dict_or_path=config)
    _cast_parameters(model, config)
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    # zero.Init(module=...) places parameters only; built inside it, buffers would be on the
    # device already, and the engine does not move a ZeRO-3 model.
    from deepspeed.accelerator import get_accelerator

    _buffers_to(model, get_accelerator().current_device_name())
    return model


def _zero_dtype(config: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype ZeRO-3 keeps floating-point weights in: the config's half precision, if any
    (what zero.Init's tensor constructors would have made), else as they are."""
    if not dtype.is_floating_point:
        return dtype
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    return dtype


def _cast_parameters(module: nn.Module, config: dict[str, Any]) -> None:
    """Cast the module's not yet partitioned parameters to `_zero_dtype` in place."""
    for param in module.parameters():
        if not hasattr(param, "ds_id") and param.dtype != _zero_dtype(config, param.dtype):
            param.data = param.data.to(_zero_dtype(config, param.dtype))


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule, each after all of its children (zero.Init(module=...) recurses)."""
    for child in module.children():
        yield from _children_first(child)
    yield module


# ----------------------------------------------- ZeRO-3 trainable weights, gathered whole

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def save_gathered_trainable(engine: Any, directory: Path) -> None:
    """Rank 0 writes the trainable weights of a ZeRO-3 engine gathered whole (model.pt, as a ddp
    checkpoint holds them, so the export reads both alike), their Adam state (optimizer.pt) and
    the lr schedule (schedule.pt). Every rank must call this."""
    weights, optim = _gather_trainable_state(engine)
    if process_rank() == 0:
        torch.save(weights, directory / "model.pt")
        torch.save(optim, directory / "optimizer.pt")
        torch.save(engine.lr_scheduler.state_dict(), directory / "schedule.pt")


def load_gathered_trainable(engine: Any, directory: Path) -> None:
    """Load what `save_gathered_trainable` wrote, at any world size, into this rank's
    partitions, and put the schedule (and the lr it gives) where it stood."""
    weights = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    check_trainable_keys(engine.module, weights)
    optim = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    _load_into_partitions(engine, weights, optim)
    schedule = engine.lr_scheduler
    schedule.load_state_dict(torch.load(directory / "schedule.pt", weights_only=True))
    # The optimizer's lr moves only when the schedule steps: set it to where it stood.
    for group, lr in zip(schedule.optimizer.param_groups, schedule.get_last_lr(), strict=True):
        group["lr"] = lr


def _gather_trainable_state(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer state) of the trainable parameters of a ZeRO-3 engine, whole and in
    fp32 on the CPU, by state-dict name: the same on every rank, whatever the world size.

    The weights are the optimizer's fp32 masters; the optimizer state holds the Adam step
    count and, once a step ran, both moments of every trainable parameter. Every rank must call
    this (each parameter is gathered from its partitions).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    trainable = _trainable_parameters(engine.module)
    weights = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in trainable}
    step = _adam_step(engine.basic_optimizer)
    optim: dict[str, Any] = {"step": step}
    if step:
        for key in ADAM_MOMENTS:
            optim[key] = {
                name: safe_get_full_optimizer_state(p, key).detach().cpu() for name, p in trainable
            }
    return weights, optim


def _load_into_partitions(
    engine: Any, weights: dict[str, torch.Tensor], optim: dict[str, Any]
) -> None:
    """Put a `_gather_trainable_state` result back into a ZeRO-3 engine of any world size: each
    rank keeps its partition of the fp32 masters, of the Adam moments and of the (possibly
    half-precision) weights the model computes with. Every rank must call this."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    deepspeed = import_deepspeed()

    trainable = _trainable_parameters(engine.module)
    if optim["step"]:
        _start_adam_state(engine, optim["step"])
    for name, param in trainable:
        safe_set_full_fp32_param(param, weights[name].float())
        for key in ADAM_MOMENTS:
            if key in optim:
                safe_set_full_optimizer_state(param, optim[key][name].float(), key)
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=0):
        if process_rank() == 0:
            with torch.no_grad():
                for name, param in trainable:
                    param.copy_(weights[name])


def _trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what trains, in module order: the order every rank gathers in."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far (0 before the first): the per-partition count Adam keeps
    (torch's as a tensor in the state, DeepSpeed's fused Adam as an int, or in its groups)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return int(optimizer.param_groups[0].get("step", 0)) if optimizer.param_groups else 0


def _start_adam_state(engine: Any, step: int) -> None:
    """Give each fp32 partition of a fresh ZeRO-3 engine an Adam state at `step` with zero
    moments, which safe_set_full_optimizer_state then fills: Adam creates its state lazily at
    its first step, and the moments can only be set into a state that exists."""
    adam = engine.basic_optimizer
    count = torch.tensor(float(step)) if type(adam).__module__.startswith("torch.") else step
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        adam.state[flat] = {
            "step": count.clone() if isinstance(count, torch.Tensor) else count,
            **{key: torch.zeros_like(flat) for key in ADAM_MOMENTS},
        }

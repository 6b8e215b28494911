"""Stage 3: a run's checkpoint -> one consolidated Hugging Face model (and its adapter).

consolidate      a checkpoint of any strategy -> one full fp32 state dict, in a plain process
                 (no process group): ddp model.pt, fsdp torch.distributed.checkpoint shards,
                 deepspeed ZeRO partitions (qlora: model.pt, the LoRA weights gathered whole)
export_model     that state dict -> the trained module rebuilt on the CPU (base model + method
                 + weights) -> run_dir/model (+ run_dir/adapter), in the layout
                 launcher.export_layout describes and reads back
export_run       the same for `ftlaunch export RUN`: which checkpoint, which recipe
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher import adapters as bottleneck
from launcher.chat import end_of_turn_ids, load_chat_template
from launcher.errors import BadInputError
from launcher.export_layout import ADAPTER_INFO_FILE, ADAPTER_WEIGHTS_FILE, EXPORT_INFO_FILE
from launcher.finetune import PEFT_METHODS, FinetuneError, apply_finetune, is_four_bit
from launcher.internals import load_dcp_without_process_group
from launcher.models import (
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    load_trainable_state,
    trainable_state,
)
from launcher.recipe import Recipe, load_recipe
from launcher.rundir import latest_checkpoint
from launcher.strategies import (
    DCP_DIR,
    DS_DIR,
    check_strategy_file,
    read_strategy_file,
)

MERGEABLE = ("lora", "qlora", "ia3")
DELTA_METHODS = ("adapter", "bitfit")  # project-side methods that also write adapter/


class ExportError(BadInputError, FileNotFoundError):
    """A run directory or checkpoint that cannot be exported (bad input: exit code 2)."""


# ------------------------------------------------------------------------------ stage 3


def find_checkpoint(run_dir: Path, name: str | None) -> Path:
    """The named checkpoint, else the one the run exported, else the newest."""
    checkpoints = run_dir / "checkpoints"
    if name is not None:
        path = checkpoints / name
        if not path.is_dir():
            have = sorted(p.name for p in checkpoints.glob("checkpoint_*"))
            raise ExportError(
                f"--checkpoint {name}: not in {checkpoints} (have: {', '.join(have) or 'none'})"
            )
        return path
    summary = run_dir / "summary.json"
    if summary.exists():
        used = json.loads(summary.read_text()).get("export", {}).get("checkpoint")
        if used and Path(used).is_dir():
            return Path(used)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise ExportError(f"{run_dir}: no checkpoint under {checkpoints}")
    return latest


def export_checkpoint(
    recipe: Recipe, checkpoint_dir: Path, out: Path, tokenizer, merge: bool
) -> dict[str, Any]:
    """Consolidate one checkpoint (any strategy) and write out/model (+ out/adapter)."""
    strategy = read_strategy_file(checkpoint_dir).get("strategy", recipe.strategy.name)
    state_dict = consolidate(strategy, checkpoint_dir)
    info = export_model(recipe, state_dict, out, tokenizer, merge)
    return {"checkpoint": str(checkpoint_dir), **(info or {})}


def export_run(
    run_dir: Path, out: Path, checkpoint: str | None, merge: bool | None
) -> dict[str, Any]:
    """Export one checkpoint of a run directory into `out`."""
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise ExportError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = load_recipe(recipe_file)
    path = find_checkpoint(run_dir, checkpoint)
    do_merge = recipe.checkpoint.export.merge_lora if merge is None else merge
    return export_checkpoint(recipe, path, out, load_tokenizer(recipe.model), do_merge)


# -------------------------------------------------------------------------- consolidation


def consolidate(strategy_name: str, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (unwrapped key names) from a checkpoint, in a plain process."""
    checkpoint_dir = Path(checkpoint_dir)
    if strategy_name not in CONSOLIDATORS:
        raise ValueError(
            f"cannot consolidate strategy {strategy_name!r}; known: {', '.join(CONSOLIDATORS)}"
        )
    check_strategy_file(checkpoint_dir, strategy_name)
    return CONSOLIDATORS[strategy_name](checkpoint_dir)


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies; floating tensors as fp32 (integer buffers keep their dtype)."""
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        out[key] = value.float() if value.is_floating_point() else value
    return out


def _consolidate_ddp(directory: Path) -> dict[str, torch.Tensor]:
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    return _fp32_cpu(state)


def _consolidate_fsdp(directory: Path) -> dict[str, torch.Tensor]:
    state = load_dcp_without_process_group(directory / DCP_DIR, keys={"model"})
    return _fp32_cpu(state["model"])


def _consolidate_deepspeed(directory: Path) -> dict[str, torch.Tensor]:
    info = read_strategy_file(directory)
    if info.get("trainable_only"):
        # qlora under ZeRO-3: the LoRA weights, gathered whole (the 4-bit base is rebuilt).
        return _consolidate_ddp(directory)
    ds_dir = directory / DS_DIR
    if info.get("zero_stage", 0) == 0:
        # No ZeRO: the engine saved the full module state dict from rank 0.
        states = torch.load(
            ds_dir / info["tag"] / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
        )
        return _fp32_cpu(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=info["tag"])
    return _fp32_cpu(state)


CONSOLIDATORS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "ddp": _consolidate_ddp,
    "fsdp": _consolidate_fsdp,
    "deepspeed": _consolidate_deepspeed,
}


# --------------------------------------------------------------------------------- export


def rebuild_trained_model(
    recipe: Recipe, state_dict: Mapping[str, torch.Tensor], *, pad_token_id: int | None = None
) -> nn.Module:
    """The trained module of a run, rebuilt on the CPU: base model + method + trained weights.

    `state_dict` has the key names of the module `apply_finetune` returned (as a consolidated
    checkpoint has them).
    """
    if recipe.finetune.method == "qlora":
        # The base comes back unquantized, in the dtype it was saved in: merging into 4-bit
        # weights would round the update away, and the export is a full-precision model. The
        # checkpoint holds only the LoRA weights (they trained on the dequantized base).
        base = load_model(
            recipe.model, dtype=checkpoint_dtype(recipe.model), pad_token_id=pad_token_id
        )
        trained = apply_finetune(base, recipe)
        try:
            load_trainable_state(trained, dict(state_dict))
        except ValueError as exc:
            raise FinetuneError(f"finetune.method qlora: {exc}") from None
        return trained
    trained = apply_finetune(load_model(recipe.model, pad_token_id=pad_token_id), recipe)
    load_trained_state(trained, state_dict)
    return trained


def load_trained_state(trained: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a full state dict; a key may be absent only when a tied twin of it is present."""
    result = trained.load_state_dict(dict(state_dict), strict=False)
    storage: dict[int, list[str]] = {}
    for key, tensor in trained.state_dict().items():
        storage.setdefault(tensor.data_ptr(), []).append(key)
    twins = {key: group for group in storage.values() for key in group}
    missing = [k for k in result.missing_keys if not any(t in state_dict for t in twins.get(k, []))]
    if missing or result.unexpected_keys:
        raise FinetuneError(
            f"state dict does not match finetune.method {_method_of(trained)}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )


def _method_of(model: nn.Module) -> str:
    config = getattr(model, "peft_config", None)
    if config:
        return str(next(iter(config.values())).peft_type.value).lower()
    return "full/freeze/bitfit/adapter"


def export_model(
    recipe: Recipe,
    state_dict: Mapping[str, torch.Tensor],
    run_dir: Path,
    tokenizer,
    merge: bool,
) -> dict[str, Any]:
    """Write run_dir/model (and run_dir/adapter for adapter methods) from a trained state dict.

    Works for any output directory, so `ftlaunch export RUN --out DIR` calls it with DIR.
    Returns the export info for summary.json (see `export_trained_model`).
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    trained = rebuild_trained_model(recipe, state_dict, pad_token_id=pad)
    return export_trained_model(trained, recipe, Path(run_dir), tokenizer, merge)


def _chat_template(recipe: Recipe, tokenizer) -> str | None:
    """The template a chat recipe trained with (None for other formats)."""
    if recipe.data.format != "chat":
        return None
    return load_chat_template(tokenizer, recipe.data.chat_template)


def _stop_at_end_of_turn(model: nn.Module, tokenizer, template: str) -> None:
    """generate() on the exported model stops where a trained assistant turn ends."""
    config = getattr(model, "generation_config", None)
    stops = end_of_turn_ids(tokenizer, template)
    if config is not None and stops:
        config.eos_token_id = stops if len(stops) > 1 else stops[0]


def _save_tokenizer(tokenizer, model_dir: str, chat_template: str | None) -> None:
    """Save the tokenizer; a chat model's carries the template it was trained with, so that
    apply_chat_template on the exported model renders prompts exactly as training did."""
    if chat_template is not None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(model_dir)


def export_trained_model(
    trained: nn.Module, recipe: Recipe, out_dir: Path, tokenizer, merge: bool
) -> dict[str, Any]:
    """Export an in-memory trained module (changes it: adapters are merged or taken out).

    Returns {"method", "model_dir", "adapter_dir", "merged", "standalone", "note",
    "model_bytes", "adapter_bytes"}; `standalone` says whether model/ alone, loaded with
    AutoModelFor*.from_pretrained, is the trained model.
    """
    method = recipe.finetune.method
    out_dir = Path(out_dir)
    model_dir, adapter_dir = out_dir / "model", out_dir / "adapter"
    for directory in (model_dir, adapter_dir):
        if directory.exists():
            shutil.rmtree(directory)
    if method == "qlora" and is_four_bit(trained):
        # Merged into 4-bit weights the update would be rounded away: the LoRA weights go onto
        # the base reloaded unquantized, as an export from a checkpoint does.
        lora = {k: v.cpu() for k, v in trainable_state(trained).items()}
        pad = getattr(tokenizer, "pad_token_id", None)
        trained = rebuild_trained_model(recipe, lora, pad_token_id=pad)
    trained = trained.cpu().eval()
    merged = False
    if method in PEFT_METHODS:
        trained.save_pretrained(str(adapter_dir))
        merged = merge and method in MERGEABLE
        plain = trained.merge_and_unload() if merged else _unwrap_peft(trained)
        standalone = merged
    elif method in DELTA_METHODS:
        _save_delta(trained, recipe, adapter_dir)
        if method == "adapter":
            bottleneck.remove_bottleneck_adapters(trained)
        plain, standalone = trained, method == "bitfit"
    else:
        plain, standalone = trained, True
        adapter_dir = None
    chat_template = _chat_template(recipe, tokenizer)
    if chat_template is not None:
        _stop_at_end_of_turn(plain, tokenizer, chat_template)
    plain.save_pretrained(str(model_dir))
    _save_tokenizer(tokenizer, str(model_dir), chat_template)
    if not standalone:
        shutil.copytree(adapter_dir, model_dir / "adapter")
    note = _export_note(method, merged, recipe.model.task)
    info: dict[str, Any] = {
        "method": method,
        "task": recipe.model.task,
        "standalone": standalone,
        "merged": merged,
        # what model/ needs attached to be the trained model (relative to model/)
        "adapter": None if standalone else "adapter",
        # the adapter alone, beside model/, whether or not model/ needs it
        "adapter_alone": "../adapter" if adapter_dir else None,
        "note": note,
    }
    if method == "qlora":
        info["trained_on"] = _four_bit_record(recipe)
        info["dtype"] = str(plain.dtype).removeprefix("torch.")
    _write_json(model_dir / EXPORT_INFO_FILE, info)
    readable_as_umask_allows(model_dir, *([adapter_dir] if adapter_dir else []))
    return {
        "method": method,
        "model_dir": str(model_dir),
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "merged": merged,
        "standalone": standalone,
        "note": note,
        "model_bytes": directory_bytes(model_dir),
        "adapter_bytes": directory_bytes(adapter_dir) if adapter_dir else 0,
    }


def _unwrap_peft(peft_model: nn.Module) -> nn.Module:
    """The base model with trained heads in place and no adapter layers (nothing merged)."""
    if not peft_model.peft_config[peft_model.active_adapter].is_prompt_learning:
        return peft_model.unload()
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = peft_model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, AuxiliaryTrainingWrapper):
            parent, _, child = name.rpartition(".")
            plain = module.unload_and_optionally_merge_module(
                merge=False, safe_merge=False, adapter_names=None
            )
            setattr(base.get_submodule(parent) if parent else base, child, plain)
    return base


def _save_delta(trained: nn.Module, recipe: Recipe, adapter_dir: Path) -> None:
    """adapter / bitfit: the trained tensors alone, loadable onto the base with load_adapter."""
    from safetensors.torch import save_file

    tensors = {
        name: p.detach().cpu().contiguous().clone()
        for name, p in trained.named_parameters()
        if p.requires_grad
    }
    adapter_dir.mkdir(parents=True)
    save_file(tensors, str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    info: dict[str, Any] = {
        "method": recipe.finetune.method,
        "task": recipe.model.task,
        "base_model_name_or_path": recipe.model.name_or_path,
    }
    if recipe.finetune.method == "adapter":
        info.update(recipe.finetune.adapter.model_dump())
    _write_json(adapter_dir / ADAPTER_INFO_FILE, info)


def _four_bit_record(recipe: Recipe) -> dict[str, Any]:
    """How the base was quantized while the adapter trained (the export itself is not)."""
    q = recipe.finetune.qlora
    return {
        "quantization": "bitsandbytes-4bit",
        "quant_type": q.quant_type,
        "double_quant": q.double_quant,
        "mixed_precision": recipe.strategy.mixed_precision,
    }


def _export_note(method: str, merged: bool, task: str) -> str:
    loader = "load with launcher.export_layout.load_exported_model(model_dir)"
    base = "the base weights" + (" (with the trained head)" if task == "classification" else "")
    if method == "qlora":
        unquantized = "the base reloaded unquantized in its own dtype"
        if merged:
            return (
                f"qlora: the adapter (trained on the 4-bit base) merged into {unquantized} in "
                "model/; adapter/ holds the unmerged peft adapter"
            )
        return (
            f"merge_lora is false: model/ holds {unquantized} and model/adapter the qlora "
            f"adapter; {loader} or peft PeftModel.from_pretrained"
        )
    if method in MERGEABLE:
        if merged:
            return f"{method} merged into model/; adapter/ holds the unmerged peft adapter"
        return (
            f"merge_lora is false: model/ holds {base} and model/adapter the {method} "
            f"adapter; {loader} or peft PeftModel.from_pretrained"
        )
    if method in ("prefix", "prompt"):
        return (
            f"{method} tuning cannot be merged into the weights: model/ holds {base} and "
            f"model/adapter the peft adapter; {loader} or peft "
            "PeftModel.from_pretrained(base, model_dir/adapter)"
        )
    if method == "adapter":
        return (
            "bottleneck adapters have no standard Hugging Face form: model/ holds "
            f"{base} and model/adapter the adapters; {loader}"
        )
    if method == "bitfit":
        return (
            "bitfit is not merged from a delta: model/ is the full model with the trained "
            "biases; adapter/ holds only the trained tensors (launcher.export_layout.load_adapter)"
        )
    return "model/ is the trained model"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def readable_as_umask_allows(*directories: Path) -> None:
    """Give every file under `directories` the mode a new file gets here (0644 under the usual
    umask): safetensors writes its files 0600, which a serving process of another user on the
    same shared storage could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for directory in directories:
        for path in Path(directory).rglob("*"):
            if path.is_file():
                path.chmod(0o666 & ~mask)


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

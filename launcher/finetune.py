"""Fine-tuning methods: which parameters train, and how the trained model is exported.

    full     every parameter trains
    lora     peft LoRA on the attention / MLP projections (`target_modules: auto` per architecture)
    adapter  bottleneck adapters after each block's feed-forward part (launcher.adapters)
    prefix   peft prefix tuning (trained key/value prefixes in every layer)
    prompt   peft prompt tuning (trained virtual token embeddings before the input)
    ia3      peft IA3 (learned rescaling of keys, values and feed-forward activations)
    bitfit   only the bias terms
    freeze   only the last `trainable_layers` blocks, the final norm and an untied head

For classification every method also trains the new classification head (`score` or
`classifier`); peft methods list it in `modules_to_save`.

Export layout (inside a run directory or any output directory):

    model/    a Hugging Face model + tokenizer + ftlaunch_export.json. For full, freeze, bitfit and
              merged lora/ia3 it alone is the trained model. For prefix, prompt, adapter and
              unmerged lora/ia3 it holds the base weights (with the trained head) and the
              adapter in model/adapter/; `load_for_inference` puts them together.
    adapter/  peft methods: the peft adapter (adapter_config.json + weights), loadable with
              `PeftModel.from_pretrained(base, "adapter")`. adapter and bitfit: only the trained
              tensors plus ftlaunch_adapter.json, loadable with `load_adapter(base, "adapter")`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher import adapters as bottleneck
from launcher.errors import BadInputError
from launcher.recipe import FinetuneConfig, Recipe

PEFT_METHODS = ("lora", "prefix", "prompt", "ia3")
MERGEABLE = ("lora", "ia3")
DELTA_METHODS = ("adapter", "bitfit")  # project-side methods that also write adapter/
HEAD_NAMES = ("score", "classifier")
EXPORT_INFO_FILE = "ftlaunch_export.json"
ADAPTER_INFO_FILE = "ftlaunch_adapter.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

_ATTENTION_MLP_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "dense"]

# LoRA targets per model family: every attention and MLP projection.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _ATTENTION_MLP_LLAMA,
    "mistral": _ATTENTION_MLP_LLAMA,
    "qwen2": _ATTENTION_MLP_LLAMA,
    "qwen3": _ATTENTION_MLP_LLAMA,
    "gemma": _ATTENTION_MLP_LLAMA,
    "gemma2": _ATTENTION_MLP_LLAMA,
    "bert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}

# IA3 (target modules, feed-forward modules) per model family: keys, values and the
# feed-forward output projection, whose input is rescaled.
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}


class FinetuneError(BadInputError, ValueError):
    """A fine-tuning method that cannot be applied to this model; names the recipe field."""


# ------------------------------------------------------------------------ model anatomy


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face `config.model_type` of a (possibly peft-wrapped) model."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def projection_module_names(model: nn.Module) -> list[str]:
    """Short names of the Linear / Conv1D modules outside the task head, in model order."""
    names: list[str] = []
    for name, module in model.named_modules():
        top = name.split(".")[0]
        if not _is_projection(module) or top in (*HEAD_NAMES, "lm_head"):
            continue
        short = name.rsplit(".", 1)[-1]
        if short not in names:
            names.append(short)
    return names


def lora_target_modules(model: nn.Module) -> list[str]:
    """The modules LoRA adapts for `target_modules: auto`: every attention / MLP projection.

    Raises FinetuneError for an architecture without a known list, naming the candidates.
    """
    kind = model_type(model)
    if kind in LORA_TARGETS:
        return list(LORA_TARGETS[kind])
    raise FinetuneError(
        f"finetune.lora.target_modules: auto does not know architecture {kind!r} "
        f"(known: {', '.join(sorted(LORA_TARGETS))}); list the modules to adapt, chosen from "
        f"this model's Linear/Conv1D modules: {', '.join(projection_module_names(model))}"
    )


def _check_targets(model: nn.Module, targets: list[str], field: str) -> None:
    """Every target must name at least one module (exactly or as a dotted suffix)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names if n)]
    if missing:
        raise FinetuneError(
            f"{field}: no module named {', '.join(repr(m) for m in missing)} in "
            f"{type(model).__name__}; candidates: {', '.join(projection_module_names(model))}"
        )


def ia3_target_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for IA3 on this architecture."""
    kind = model_type(model)
    if kind in IA3_TARGETS:
        targets, feedforward = IA3_TARGETS[kind]
        return list(targets), list(feedforward)
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if kind in TARGETS and kind in FEEDFORWARD:
        return list(TARGETS[kind]), list(FEEDFORWARD[kind])
    raise FinetuneError(
        f"finetune.method: ia3 does not know which modules to rescale in architecture {kind!r} "
        f"(known: {', '.join(sorted(set(IA3_TARGETS) | set(TARGETS)))}); use lora, whose "
        f"target_modules can be listed (this model's Linear/Conv1D modules: "
        f"{', '.join(projection_module_names(model))})"
    )


def classification_head_names(model: nn.Module) -> list[str]:
    """Top-level modules that form the classification head (`score` or `classifier`)."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def _final_modules(model: nn.Module) -> list[nn.Module]:
    """Modules after the last block: the final norm (ln_f / norm) and BERT's pooler."""
    base = getattr(model, "base_model", model)
    out = []
    for name, module in base.named_children():
        is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        if is_norm or name == "pooler":
            out.append(module)
    return out


def _head_is_tied(model: nn.Module) -> bool:
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    return output is not None and inputs is not None and output.weight is inputs.weight


# ------------------------------------------------------------------------------ methods


def _require_head(model: nn.Module, task: str, method: str) -> list[str]:
    heads = classification_head_names(model) if task == "classification" else []
    if task == "classification" and not heads:
        raise FinetuneError(
            f"finetune.method {method}: {type(model).__name__} has no classification head named "
            f"{' or '.join(HEAD_NAMES)} to train"
        )
    return heads


def _train_only(model: nn.Module, modules: list[nn.Module]) -> nn.Module:
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return model


def _full(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    return model.requires_grad_(True)


def _freeze(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    _, blocks = bottleneck.find_blocks(model)
    n = cfg.trainable_layers
    if n > len(blocks):
        raise FinetuneError(
            f"finetune.trainable_layers: {n} is more than the model's {len(blocks)} blocks"
        )
    trainable = [*blocks[len(blocks) - n :], *_final_modules(model)]
    trainable += [model.get_submodule(h) for h in _require_head(model, task, "freeze")]
    if task == "causal_lm" and not _head_is_tied(model):
        # A tied LM head is the input embedding matrix: it stays frozen with the other layers.
        trainable.append(model.get_output_embeddings())
    return _train_only(model, trainable)


def _bitfit(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    heads = [model.get_submodule(h) for h in _require_head(model, task, "bitfit")]
    _train_only(model, heads)
    head_ids = {id(p) for h in heads for p in h.parameters()}
    biases = [
        p
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] == "bias" and id(p) not in head_ids
    ]
    if not biases:
        raise FinetuneError(
            f"finetune.method: bitfit trains bias terms, and {type(model).__name__} has none; "
            "use lora, ia3 or adapter for this model"
        )
    for p in biases:
        p.requires_grad_(True)
    return model


def _adapter(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    heads = [model.get_submodule(h) for h in _require_head(model, task, "adapter")]
    model.requires_grad_(False)
    try:
        bottleneck.add_bottleneck_adapters(
            model, cfg.adapter.reduction_factor, cfg.adapter.non_linearity
        )
    except bottleneck.AdapterPlacementError as exc:
        raise FinetuneError(str(exc)) from None
    trainable = [*bottleneck.adapter_modules(model).values(), *heads]
    for module in trainable:
        module.requires_grad_(True)
    return model


def peft_config(model: nn.Module, cfg: FinetuneConfig, task: str):
    """The peft config of a peft method for this model and task."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task_type = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    heads = _require_head(model, task, cfg.method) or None
    common: dict[str, Any] = {"task_type": task_type, "modules_to_save": heads}
    if cfg.method == "lora":
        lora = cfg.lora
        if lora.target_modules == "auto":
            targets = lora_target_modules(model)
        else:
            targets = list(lora.target_modules)
            _check_targets(model, targets, "finetune.lora.target_modules")
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            fan_in_fan_out=_targets_are_conv1d(model, targets),
            **common,
        )
    if cfg.method == "ia3":
        targets, feedforward = ia3_target_modules(model)
        return IA3Config(
            target_modules=targets,
            feedforward_modules=feedforward,
            fan_in_fan_out=_targets_are_conv1d(model, targets),
            **common,
        )
    if cfg.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if cfg.method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    raise ValueError(f"{cfg.method} is not a peft method")


def _targets_are_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2 stores projections as Conv1D (weight transposed); peft must know."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D)
        for name, m in model.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets)
    )


def _peft(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, cfg, task))


METHODS = {
    "full": _full,
    "freeze": _freeze,
    "bitfit": _bitfit,
    "adapter": _adapter,
    "lora": _peft,
    "prefix": _peft,
    "prompt": _peft,
    "ia3": _peft,
}


def apply_finetune(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Set which parameters train for `recipe.finetune.method`; returns the module to train.

    full, freeze, bitfit and adapter change `model` in place and return it; peft methods
    return the PeftModel wrapping it. Raises FinetuneError when the method cannot apply.
    """
    return METHODS[recipe.finetune.method](model, recipe.finetune, recipe.model.task)


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """{"trainable", "total", "percent"}; shared (tied) parameters count once.

    Parameters partitioned by DeepSpeed ZeRO-3 are counted at their full size.
    """
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    percent = round(100.0 * trainable / total, 4) if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent}


def describe_parameters(counts: Mapping[str, Any]) -> str:
    """One line for the log: `trainable params: 1,234 / 56,789 (2.17%)`."""
    return (
        f"trainable params: {counts['trainable']:,} / {counts['total']:,} "
        f"({counts['percent']:.2f}%)"
    )


# ------------------------------------------------------------------------------- export


def rebuild_trained_model(
    recipe: Recipe, state_dict: Mapping[str, torch.Tensor], *, pad_token_id: int | None = None
) -> nn.Module:
    """The trained module of a run, rebuilt on the CPU: base model + method + trained weights.

    `state_dict` has the key names of the module `apply_finetune` returned (as a consolidated
    checkpoint has them).
    """
    from launcher.models import load_model

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
    plain.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    if not standalone:
        shutil.copytree(adapter_dir, model_dir / "adapter")
    note = _export_note(method, merged, recipe.model.task)
    _write_json(
        model_dir / EXPORT_INFO_FILE,
        {
            "method": method,
            "task": recipe.model.task,
            "standalone": standalone,
            "merged": merged,
            "adapter": None if standalone else "adapter",
            "note": note,
        },
    )
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


def _export_note(method: str, merged: bool, task: str) -> str:
    loader = "load with launcher.finetune.load_for_inference(model_dir)"
    base = "the base weights" + (" (with the trained head)" if task == "classification" else "")
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
            "biases; adapter/ holds only the trained tensors (launcher.finetune.load_adapter)"
        )
    return "model/ is the trained model"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ loading


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Put an exported adapter (peft, bottleneck adapter or bitfit delta) onto a base model."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir))
    info_file = adapter_dir / ADAPTER_INFO_FILE
    if not info_file.exists():
        raise FinetuneError(
            f"{adapter_dir} is not an adapter directory (neither adapter_config.json nor "
            f"{ADAPTER_INFO_FILE} in it)"
        )
    from safetensors.torch import load_file

    info = json.loads(info_file.read_text())
    if info["method"] == "adapter":
        bottleneck.add_bottleneck_adapters(base, info["reduction_factor"], info["non_linearity"])
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    result = base.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise FinetuneError(
            f"{adapter_dir}: tensors do not fit {type(base).__name__}: "
            f"{', '.join(result.unexpected_keys[:5])}"
        )
    return base


def load_for_inference(
    path: str | Path, *, dtype: torch.dtype | None = None, task: str | None = None
) -> nn.Module:
    """The trained model of a run directory or an exported model/ directory, in eval mode.

    Reads model/ftlaunch_export.json: when model/ is not standalone the adapter in
    model/adapter is put on top. Plain Hugging Face directories load as they are.
    """
    from launcher.models import model_class

    path = Path(path)
    if (path / "model").is_dir():
        path = path / "model"
    task = task or _export_info(path).get("task") or _task_of(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = model_class(task).from_pretrained(str(path), **kwargs)
    return attach_exported_adapter(model, path).eval()


def attach_exported_adapter(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """`model` loaded from an exported model/ directory, with its adapter put on when needed.

    Exports of prefix, prompt, adapter and unmerged lora/ia3 keep the adapter in model/adapter
    (ftlaunch_export.json says so); any other directory gives `model` back unchanged.
    """
    adapter = _export_info(Path(model_dir)).get("adapter")
    return load_adapter(model, Path(model_dir) / adapter) if adapter else model


def _export_info(model_dir: Path) -> dict[str, Any]:
    info_file = model_dir / EXPORT_INFO_FILE
    return json.loads(info_file.read_text()) if info_file.exists() else {}


def _task_of(model_dir: Path) -> str:
    from transformers import AutoConfig

    from launcher.models import task_from_architectures

    architectures = AutoConfig.from_pretrained(str(model_dir)).architectures
    return task_from_architectures(architectures) or "causal_lm"

"""Fine-tuning methods: which parameters train (launcher.export writes the trained model out).

    full     every parameter trains
    lora     peft LoRA on the attention / MLP projections (`target_modules: auto` per architecture)
    qlora    the same LoRA on a base loaded with 4-bit (NF4) weights by bitsandbytes
    adapter  bottleneck adapters after each block's feed-forward part (launcher.adapters)
    prefix   peft prefix tuning (trained key/value prefixes in every layer)
    prompt   peft prompt tuning (trained virtual token embeddings before the input)
    ia3      peft IA3 (learned rescaling of keys, values and feed-forward activations)
    bitfit   only the bias terms
    freeze   only the last `trainable_layers` blocks, the final norm and an untied head

For classification every method also trains the new classification head (`score` or
`classifier`); peft methods list it in `modules_to_save`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from launcher import adapters as bottleneck
from launcher.deepspeed_config import mixed_precision_name
from launcher.errors import BadInputError
from launcher.models import (
    BlocksNotFoundError,
    FourBit,
    load_four_bit_model,
    load_model,
    transformer_blocks,
)
from launcher.recipe import FinetuneConfig, Recipe

PEFT_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3")
LORA_METHODS = ("lora", "qlora")
HEAD_NAMES = ("score", "classifier")

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


def _blocks_for(model: nn.Module, method: str) -> tuple[str, nn.ModuleList]:
    try:
        return transformer_blocks(model)
    except BlocksNotFoundError as exc:
        raise FinetuneError(f"finetune.method {method}: {exc}") from None


def _train_only(model: nn.Module, modules: list[nn.Module]) -> nn.Module:
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return model


def _full(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    return model.requires_grad_(True)


def _freeze(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    _, blocks = _blocks_for(model, "freeze")
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
    blocks = _blocks_for(model, "adapter")
    try:
        bottleneck.add_bottleneck_adapters(
            model, blocks, cfg.adapter.reduction_factor, cfg.adapter.non_linearity
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
    if cfg.method in LORA_METHODS:
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
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
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


def _qlora(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    """LoRA on the 4-bit base, prepared the way peft expects: base frozen, its remaining
    half-precision weights (norms, embeddings, head) in fp32. An unquantized base (the export
    rebuilds the trained model on one) gets the same LoRA layers, under the same names."""
    if is_four_bit(model):
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing is the strategy's to switch on (strategy.
        # activation_checkpointing), non-reentrant, which needs none of the input-gradient
        # hooks peft adds for the reentrant kind.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _peft(model, cfg, task)


def is_four_bit(model: nn.Module) -> bool:
    """Whether bitsandbytes 4-bit layers hold some of the model's weights."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


METHODS = {
    "full": _full,
    "freeze": _freeze,
    "bitfit": _bitfit,
    "adapter": _adapter,
    **dict.fromkeys(PEFT_METHODS, _peft),
    "qlora": _qlora,
}


def four_bit_settings(recipe: Recipe, device: torch.device | str) -> FourBit:
    """finetune.qlora with the compute dtype strategy.mixed_precision gives on `device`
    (bf16 -> bfloat16, fp16 -> float16, no -> float32; auto: bf16 on GPUs that have it).

    Under a sharding strategy (fsdp, deepspeed) the packed weights are stored in that dtype
    too, the one the strategy gives the parameters it gathers, so they shard and gather as
    plain floating-point tensors and come back bit for bit; ddp keeps the default uint8.
    """
    device = torch.device(device)
    precision = mixed_precision_name(
        recipe.strategy.mixed_precision, device.type, torch.cuda.is_bf16_supported
    )
    q = recipe.finetune.qlora
    compute = COMPUTE_DTYPES[precision]
    return FourBit(
        quant_type=q.quant_type,
        double_quant=q.double_quant,
        compute_dtype=compute,
        storage_dtype=compute if recipe.strategy.name in SHARDING_STRATEGIES else torch.uint8,
    )


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
SHARDING_STRATEGIES = ("fsdp", "deepspeed")


def load_base_model(
    recipe: Recipe, *, pad_token_id: int | None = None, device: torch.device | str = "cpu"
) -> nn.Module:
    """The model `apply_finetune` starts from: for qlora quantized to 4 bits on `device`,
    for every other method as load_model loads it (the strategy moves it later)."""
    if recipe.finetune.method != "qlora":
        return load_model(recipe.model, pad_token_id=pad_token_id)
    # A new classification head trains whole (modules_to_save): it must stay unquantized.
    heads = list(HEAD_NAMES) if recipe.model.task == "classification" else []
    return load_four_bit_model(
        recipe.model,
        four_bit_settings(recipe, device),
        device=device,
        pad_token_id=pad_token_id,
        skip_modules=heads,
    )


def apply_finetune(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Set which parameters train for `recipe.finetune.method`; returns the module to train.

    full, freeze, bitfit and adapter change `model` in place and return it; peft methods
    return the PeftModel wrapping it. Raises FinetuneError when the method cannot apply.
    """
    return METHODS[recipe.finetune.method](model, recipe.finetune, recipe.model.task)


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """{"trainable", "total", "percent"}; shared (tied) parameters count once.

    Parameters partitioned by DeepSpeed ZeRO-3 are counted at their full size, 4-bit weights
    (two to a byte) as the weights they stand for.
    """
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or _unpacked_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    percent = round(100.0 * trainable / total, 4) if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent}


def _unpacked_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter holds; a bitsandbytes 4-bit one packs two per byte
    and keeps the original shape in its quantization state."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else param.numel()

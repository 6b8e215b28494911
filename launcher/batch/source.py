"""The model a batch job runs: a run directory, a model directory or a hub id, resolved once in
the driver to a ModelSource (task, labels, adapter), and loaded for scoring inside each actor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.batch.inputs import BatchInputError


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from and what it does, resolved once in the driver."""

    name_or_path: str
    task: str
    labels: tuple[str, ...] | None = None
    adapter: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    trained_format: dict | None = None
    """A run directory's data layout (format, prompt_template, system_prompt): what the model
    learned to read, for generate's defaults."""

    def model_config(self):
        from launcher.recipe import ModelConfig

        return ModelConfig(
            name_or_path=self.name_or_path,
            task=self.task,
            labels=list(self.labels) if self.labels else None,
            gguf_file=self.gguf_file,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )


def _labels_from_config(config: dict) -> tuple[str, ...] | None:
    id2label = config.get("id2label") or {}
    if not id2label:
        return None
    return tuple(str(id2label[key]) for key in sorted(id2label, key=int))


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(os.sep)


def _finish_source(
    where: str, name_or_path: str, config: dict, task: str | None, **extra: Any
) -> ModelSource:
    """Pick the task (given, or from the architectures) and the labels of a classifier."""
    from launcher.models import task_from_architectures  # imports torch

    task = task or task_from_architectures(config.get("architectures"))
    if task is None:
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise BatchInputError(
            f"cannot tell whether {where} is a causal LM or a classifier (architectures: "
            f"{archs}); pass task='causal_lm' or task='classification' (--task)"
        )
    if task not in ("causal_lm", "classification"):
        raise BatchInputError(f"task {task!r} is not allowed; choose causal_lm or classification")
    labels = extra.pop("labels", None)
    if task == "classification":
        labels = labels or _labels_from_config(config)
        if not labels or len(labels) < 2:
            raise BatchInputError(f"classification model {where} names fewer than two labels")
    return ModelSource(name_or_path, task, tuple(labels) if labels else None, **extra)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BatchInputError(f"cannot read {path}: {exc}") from None


def _directory_config(directory: Path, trust_remote_code: bool = False) -> dict:
    """A model directory's config as transformers reads it, defaults included (transformers 5
    leaves a default id2label, LABEL_0 and LABEL_1, out of config.json). A config transformers
    cannot interpret (no model_type, remote code not trusted) is taken as written."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return _read_json(directory / "config.json")
    return config.to_dict()


def _resolve_run_dir(run: Path, task: str | None) -> ModelSource:
    recipe: dict = {}
    if (run / "recipe.yaml").exists():
        import yaml

        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    recipe_model = recipe.get("model") or {}
    data = recipe.get("data") or {}
    task = task or recipe_model.get("task")
    labels = recipe_model.get("labels")
    common = {
        "trust_remote_code": bool(recipe_model.get("trust_remote_code", False)),
        "trained_format": {
            key: data.get(key) for key in ("format", "prompt_template", "system_prompt")
        },
    }
    if (run / "model" / "config.json").exists():
        config = _directory_config(run / "model", common["trust_remote_code"])
        return _finish_source(str(run), str(run / "model"), config, task, labels=labels, **common)
    if (run / "adapter").is_dir():
        base = recipe_model.get("name_or_path")
        if not base:
            raise BatchInputError(
                f"run directory {run} has adapter/ but no model.name_or_path in recipe.yaml "
                "to name the base model"
            )
        adapter_cfg = _read_json(run / "adapter" / "adapter_config.json")
        if task is None:
            peft_task = adapter_cfg.get("task_type")
            task = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}.get(peft_task)
        config = {}
        if Path(base).is_dir() and (Path(base) / "config.json").exists():
            config = _directory_config(Path(base), common["trust_remote_code"])
        return _finish_source(
            str(run),
            base,
            config,
            task,
            labels=labels,
            adapter=str(run / "adapter"),
            gguf_file=recipe_model.get("gguf_file"),
            **common,
        )
    raise BatchInputError(
        f"run directory {run} has neither model/ nor adapter/ (did training finish exporting?)"
    )


def _resolve_hub_id(ref: str, task: str | None) -> ModelSource:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref).to_dict()
    except (OSError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BatchInputError(
            f"model {ref!r} is neither a local directory nor reachable on the Hugging Face "
            f"hub{offline}: {first}"
        ) from None
    return _finish_source(ref, ref, config, task)


def resolve_model(model_ref: str | Path, *, task: str | None = None) -> ModelSource:
    """Resolve a run directory, a model directory or a hub id to a ModelSource.

    A run directory means its model/ (consolidated), or the base model named in its recipe.yaml
    plus adapter/ when model/ is absent. The task comes from `task`, the recipe, or the model's
    architectures, in that order.
    """
    ref = str(model_ref)
    path = Path(os.path.expandvars(os.path.expanduser(ref)))
    if path.is_dir():
        if any((path / name).exists() for name in ("recipe.yaml", "model", "adapter")):
            return _resolve_run_dir(path, task)
        if (path / "config.json").exists():
            return _finish_source(str(path), str(path), _directory_config(path), task)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _finish_source(
                str(path), str(path), {}, task or "causal_lm", gguf_file=ggufs[0].name
            )
        raise BatchInputError(
            f"{path} is neither a run directory (model/ or adapter/) nor a model directory "
            "(config.json)"
        )
    if path.exists() or _looks_like_path(ref):
        raise BatchInputError(f"model directory not found: {ref}")
    return _resolve_hub_id(ref, task)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").exists()


def load_scoring_model(source: ModelSource, device=None):
    """Load (model, tokenizer) for inference: eval mode, on `device`, adapter applied."""
    import torch

    from launcher.models import load_model, resolve_dtype

    device = device or torch.device("cpu")
    cfg = source.model_config()
    tokenizer = scoring_tokenizer(source)
    model = load_model(
        cfg, dtype=resolve_dtype(cfg.dtype, device), pad_token_id=tokenizer.pad_token_id
    )
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter)
    elif Path(cfg.name_or_path).is_dir():
        from launcher.export_layout import attach_exported_adapter

        # prefix / prompt / adapter exports keep their adapter in model/adapter.
        model = attach_exported_adapter(model, cfg.name_or_path)
    return model.to(device).eval(), tokenizer


def scoring_tokenizer(source: ModelSource):
    """The tokenizer the batch actors use: the adapter's own when it ships one."""
    from launcher.models import load_tokenizer

    cfg = source.model_config()
    if source.adapter and _has_tokenizer(Path(source.adapter)):
        cfg = cfg.model_copy(update={"name_or_path": source.adapter, "gguf_file": None})
    return load_tokenizer(cfg)

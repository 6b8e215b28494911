"""The exported model directory: its file names, and how to load it back.

launcher.export writes the layout; batch scoring and `load_exported_model` read it.

    model/    a Hugging Face model + tokenizer + ftlaunch_export.json. For full, freeze, bitfit and
              merged lora/ia3 it alone is the trained model. For prefix, prompt, adapter and
              unmerged lora/ia3 it holds the base weights (with the trained head) and the
              adapter in model/adapter/; `load_exported_model` puts them together.
    adapter/  peft methods: the peft adapter (adapter_config.json + weights), loadable with
              `PeftModel.from_pretrained(base, "adapter")`. adapter and bitfit: only the trained
              tensors plus ftlaunch_adapter.json, loadable with `load_adapter(base, "adapter")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher import adapters as bottleneck
from launcher.finetune import FinetuneError
from launcher.models import (
    BlocksNotFoundError,
    model_class,
    task_from_architectures,
    transformer_blocks,
)

EXPORT_INFO_FILE = "ftlaunch_export.json"
ADAPTER_INFO_FILE = "ftlaunch_adapter.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


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
        try:
            blocks = transformer_blocks(base)
        except BlocksNotFoundError as exc:
            raise bottleneck.AdapterPlacementError(str(exc)) from None
        bottleneck.add_bottleneck_adapters(
            base, blocks, info["reduction_factor"], info["non_linearity"]
        )
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    result = base.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise FinetuneError(
            f"{adapter_dir}: tensors do not fit {type(base).__name__}: "
            f"{', '.join(result.unexpected_keys[:5])}"
        )
    return base


def load_exported_model(
    path: str | Path, *, dtype: torch.dtype | None = None, task: str | None = None
) -> nn.Module:
    """The trained model of a run directory or an exported model/ directory, in eval mode.

    Reads model/ftlaunch_export.json: when model/ is not standalone the adapter in
    model/adapter is put on top. Plain Hugging Face directories load as they are.
    """
    path = Path(path)
    if (path / "model").is_dir():
        path = path / "model"
    task = task or export_info(path).get("task") or _task_of(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = model_class(task).from_pretrained(str(path), **kwargs)
    return attach_exported_adapter(model, path).eval()


def attach_exported_adapter(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """`model` loaded from an exported model/ directory, with its adapter put on when needed.

    Exports of prefix, prompt, adapter and unmerged lora/ia3 keep the adapter in model/adapter
    (ftlaunch_export.json says so); any other directory gives `model` back unchanged.
    """
    adapter = export_info(Path(model_dir)).get("adapter")
    return load_adapter(model, Path(model_dir) / adapter) if adapter else model


def export_info(model_dir: Path) -> dict[str, Any]:
    """model_dir/ftlaunch_export.json, or {} for a directory ftlaunch did not export."""
    info_file = model_dir / EXPORT_INFO_FILE
    return json.loads(info_file.read_text()) if info_file.exists() else {}


def _task_of(model_dir: Path) -> str:
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(str(model_dir)).architectures
    return task_from_architectures(architectures) or "causal_lm"

"""Bottleneck adapters: a small residual MLP after each transformer block's feed-forward part.

    h  ->  h + up(act(down(h)))        down: hidden -> hidden / reduction_factor, up: back

The up-projection starts at zero, so a freshly adapted model computes exactly what the base
model computes; training moves it away from there.

Placement keeps the base model's parameter names untouched: each adapter is registered as a child
named `bottleneck_adapter` of the module whose output it transforms (GPT-2 / Llama `mlp`, BERT
`output.dense`), and a forward hook on that module applies it. A state dict of an adapted model is
therefore the base state dict plus `...bottleneck_adapter.{down,up}.{weight,bias}` entries, and
removing the adapters gives back a standard Hugging Face model.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.errors import BadInputError

ADAPTER_ATTR = "bottleneck_adapter"

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Where the feed-forward output of a block is, per model family (path inside one block).
FEED_FORWARD_OUTPUT = {
    "gpt2": "mlp",
    "llama": "mlp",
    "mistral": "mlp",
    "qwen2": "mlp",
    "qwen3": "mlp",
    "gemma": "mlp",
    "gemma2": "mlp",
    "bert": "output.dense",
    "roberta": "output.dense",
    "xlm-roberta": "output.dense",
    "electra": "output.dense",
    "distilbert": "ffn",
}


class AdapterPlacementError(BadInputError, ValueError):
    """The model's blocks or their feed-forward part cannot be found."""


class BottleneckAdapter(nn.Module):
    """down-projection, non-linearity, up-projection, plus the residual connection."""

    def __init__(self, hidden_size: int, bottleneck: int, non_linearity: str = "relu"):
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"unknown adapter non_linearity {non_linearity!r}; "
                f"choose one of {', '.join(ACTIVATIONS)}"
            )
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden_size)
        # Zero up-projection: the adapter starts as the identity, so the base model's outputs
        # are unchanged until training moves it.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


def _apply_adapter_hook(module: nn.Module, args, output):
    """Forward hook: pass the module's output through its own adapter child.

    A module-level function looking the adapter up on `module` (rather than a closure over it)
    keeps deep copies of the model consistent: each copy calls its own adapter.
    """
    adapter = getattr(module, ADAPTER_ATTR)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def feed_forward_path(model: nn.Module, block: nn.Module) -> str:
    """Path, inside one block, of the module whose output the adapter transforms."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FEED_FORWARD_OUTPUT:
        return FEED_FORWARD_OUTPUT[model_type]
    if hasattr(block, "mlp"):
        return "mlp"
    output = getattr(block, "output", None)
    if output is not None and hasattr(output, "dense"):
        return "output.dense"
    children = ", ".join(name for name, _ in block.named_children())
    raise AdapterPlacementError(
        f"finetune.method adapter: cannot find the feed-forward part of a {type(block).__name__} "
        f"block (architecture {model_type!r}; block children: {children})"
    )


def add_bottleneck_adapters(
    model: nn.Module,
    blocks: tuple[str, nn.ModuleList],
    reduction_factor: int = 16,
    non_linearity: str = "relu",
) -> list[str]:
    """Insert an adapter after every block's feed-forward part; returns the adapted module names.

    `blocks` is the model's block list and its dotted name (launcher.models.transformer_blocks).
    Adapters are created on the device and in the dtype of the module they follow.
    """
    hidden = model.config.hidden_size
    bottleneck = max(1, hidden // reduction_factor)
    blocks_name, blocks_list = blocks
    path = feed_forward_path(model, blocks_list[0])
    names = []
    for index, block in enumerate(blocks_list):
        target = block.get_submodule(path)
        if hasattr(target, ADAPTER_ATTR):
            raise AdapterPlacementError(f"{blocks_name}.{index}.{path} already has an adapter")
        reference = next(target.parameters(), None)
        adapter = BottleneckAdapter(hidden, bottleneck, non_linearity)
        if reference is not None and reference.numel() > 0:
            adapter.to(device=reference.device, dtype=reference.dtype)
        target.add_module(ADAPTER_ATTR, adapter)
        target.register_forward_hook(_apply_adapter_hook)
        names.append(f"{blocks_name}.{index}.{path}")
    return names


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Adapted module name -> its adapter."""
    return {
        name: getattr(module, ADAPTER_ATTR)
        for name, module in model.named_modules()
        if isinstance(getattr(module, ADAPTER_ATTR, None), BottleneckAdapter)
    }


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to a bottleneck adapter."""
    return f".{ADAPTER_ATTR}." in f".{key}"


def remove_bottleneck_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Take every adapter out of `model` (in place); returns their weights by state-dict key."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter_key(k)}
    for module in list(adapter_modules(model)):
        target = model.get_submodule(module)
        for hook_id, hook in list(target._forward_hooks.items()):
            if hook is _apply_adapter_hook:
                del target._forward_hooks[hook_id]
        delattr(target, ADAPTER_ATTR)
    return weights

"""What the benchmark runs on, and the model FLOPs utilisation (MFU) of a training run.

On a machine with CUDA the harness trains bigger models on the GPUs and reports MFU next to
tokens/s: the FLOPs a step needs by the model's shape, divided by what the GPUs could do at
their dense bf16 peak. The peak comes from the table below by device name, or from
FTLAUNCH_PEAK_TFLOPS (per GPU) for devices it does not list.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

# Dense bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets. Matched in order
# against the device name, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16: V100 has no bf16 tensor cores
    ("T4", 65.0),  # fp16, likewise
)


@dataclass(frozen=True)
class Accelerator:
    """The device training runs on in this benchmark run."""

    device: str  # "cuda" or "cpu"
    name: str
    count: int
    peak_tflops: float | None  # per device; None when unknown (and always on CPU)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU by name; FTLAUNCH_PEAK_TFLOPS overrides the table."""
    override = os.environ.get("FTLAUNCH_PEAK_TFLOPS")
    if override:
        return float(override)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def detect() -> Accelerator:
    """CUDA GPUs when torch sees any (unless FTLAUNCH_BENCH_DEVICE=cpu), else the CPU."""
    import platform

    import torch

    wanted = os.environ.get("FTLAUNCH_BENCH_DEVICE", "auto")
    if wanted != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Accelerator("cuda", name, torch.cuda.device_count(), peak_tflops(name))
    return Accelerator("cpu", platform.processor() or platform.machine(), 1, None)


def matmul_parameters(model) -> int:
    """Weights that multiply activations (linear layers and the LM head, tied or not); the
    FLOPs of a step scale with these, not with looked-up embedding tables."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Linear | Conv1D)
    )


def training_flops_per_token(
    params: int, layers: int, hidden: int, length: int, *, frozen_base: bool
) -> float:
    """FLOPs to train on one token. Per matmul weight: 2 forward, 2 for the activation gradient
    and 2 for the weight gradient, which a frozen base (LoRA) skips. Attention scores and
    values: 4 * hidden * length per layer forward, twice that backward, frozen base or not
    (their inputs still need gradients). The small LoRA matrices are left out."""
    per_param = 4.0 if frozen_base else 6.0
    return per_param * params + 12.0 * layers * hidden * length


def mfu(tokens_per_s: float | None, flops_per_token: float, accel: Accelerator, devices: int):
    """Achieved / peak FLOP/s over `devices` GPUs; None without a known peak."""
    if tokens_per_s is None or accel.peak_tflops is None or devices <= 0:
        return None
    return tokens_per_s * flops_per_token / (accel.peak_tflops * 1e12 * devices)

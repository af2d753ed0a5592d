"""Backend choice for ``rat_mixing``: the portable PyTorch path or the GPU fast path.

``RAT_KERNELS`` (auto | torch | triton) picks the chunk scan; ``RAT_ATTENTION`` (auto | torch |
flex) picks the inter-chunk attention. ``auto`` (the default) means the fast path on CUDA
tensors and the portable path elsewhere; an auto attention also follows ``RAT_KERNELS=torch``.
The Triton scan off CUDA needs ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests).
flex attention on CPU runs eagerly and forward-only (torch has no CPU flex backward).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rat_plugin.ops.chunk_attention import chunk_attention
from rat_plugin.ops.chunk_scan import chunk_scan

KERNELS_ENV = "RAT_KERNELS"
ATTENTION_ENV = "RAT_ATTENTION"
_KERNEL_CHOICES = ("auto", "torch", "triton")
_ATTENTION_CHOICES = ("auto", "torch", "flex")


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class MixingKernels:
    """The chosen implementations: scan "torch" | "triton", attention "torch" | "flex"."""

    scan: str
    attention: str

    @property
    def chunk_scan(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        if self.scan == "triton":
            from rat_plugin.ops.triton_chunk_scan import triton_chunk_scan

            return triton_chunk_scan
        return chunk_scan

    @property
    def chunk_attention(self) -> Callable[..., torch.Tensor]:
        if self.attention == "flex":
            from rat_plugin.ops.flex_chunk_attention import flex_chunk_attention

            return flex_chunk_attention
        return chunk_attention


def select_kernels(device: torch.device) -> MixingKernels:
    """Read RAT_KERNELS / RAT_ATTENTION and pick the kernels for tensors on ``device``."""
    kernels = _env_choice(KERNELS_ENV, _KERNEL_CHOICES)
    attention = _env_choice(ATTENTION_ENV, _ATTENTION_CHOICES)
    on_cuda = device.type == "cuda"
    if kernels == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{KERNELS_ENV}=triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 "
            f"(Triton's CPU interpreter); use {KERNELS_ENV}=auto or torch on this machine"
        )
    if kernels == "auto":
        kernels = "triton" if on_cuda else "torch"
    if attention == "auto":
        attention = "flex" if on_cuda and kernels != "torch" else "torch"
    return MixingKernels(scan=kernels, attention=attention)

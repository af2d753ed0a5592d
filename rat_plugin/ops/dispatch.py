"""Kernel choice for the mixers: the portable PyTorch path or the GPU program.

A model chooses with ``RATModelArgs.scan_kernel`` (auto | torch | triton | triton_autotune)
and ``attention_kernel`` (auto | torch | flex | flex_bf16); the trainer sets both from ``[rat]``
in the TOML and logs the result once. The environment variables ``RAT_KERNELS`` and
``RAT_ATTENTION`` override the setting when set. ``auto`` means the GPU program on CUDA tensors (the Triton scan custom op
and flex_attention) and the portable path elsewhere; an auto attention follows a torch scan.
``triton_autotune`` and ``flex_bf16`` are GPU speed choices not yet measured on a GPU: the scan
with an autotuned block width and warp count, and flex over bf16 queries and summaries with the
own-state merge kept in fp32.

Off CUDA the Triton custom op runs its CPU body, so the GPU program executes on CPU too (with
the same ops, autograd formulas and compiled graphs); flex_attention's backward is refused by
torch on CPU (see docs/design.md, "Kernel matrix").
"""

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rat_plugin.ops.chunk_attention import chunk_attention
from rat_plugin.ops.chunk_scan import chunk_scan
from rat_plugin.ops.window_attention import window_attention

# Whether the GPU programs (Triton scan, flex_attention, flash-attn decoding) are here: False in
# the code a transformers export carries (rat_plugin/hf/remote_code.py), where auto then means
# the portable path on every device and an explicit GPU choice is refused.
GPU_PROGRAMS = True
KERNELS_ENV = "RAT_KERNELS"
ATTENTION_ENV = "RAT_ATTENTION"
SCAN_KERNELS = ("auto", "torch", "triton", "triton_autotune")
ATTENTION_KERNELS = ("auto", "torch", "flex", "flex_bf16")
FLEX_MIN_HEAD_DIM = 16  # inductor's flex_attention kernels refuse smaller heads


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str):
        value = value.strip().lower() or "auto"
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _override(env: str, configured: str, choices: tuple[str, ...], setting: str) -> str:
    if env in os.environ:
        return check_choice(env, os.environ[env], choices)
    return check_choice(setting, configured, choices)


@dataclass(frozen=True)
class MixingKernels:
    """The chosen implementations: a scan and an attention kernel name (no "auto")."""

    scan: str
    attention: str

    @property
    def chunk_scan(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        if self.scan.startswith("triton"):
            from rat_plugin.ops.triton_chunk_scan import triton_chunk_scan

            if self.scan == "triton_autotune":
                return functools.partial(triton_chunk_scan, autotune=True)
            return triton_chunk_scan
        return chunk_scan

    @property
    def chunk_attention(self) -> Callable[..., torch.Tensor]:
        if self.attention.startswith("flex"):
            from rat_plugin.ops.flex_chunk_attention import flex_chunk_attention

            if self.attention == "flex_bf16":
                return functools.partial(flex_chunk_attention, flex_dtype=torch.bfloat16)
            return flex_chunk_attention
        return chunk_attention

    @property
    def window_attention(self) -> Callable[..., torch.Tensor]:
        """SWA's inputs are in the model dtype already: flex_bf16 is flex there."""
        if self.attention.startswith("flex"):
            from rat_plugin.ops.flex_window_attention import flex_window_attention

            return flex_window_attention
        return window_attention


def select_kernels(
    device: torch.device, scan: str = "auto", attention: str = "auto",
    head_dim: int | None = None,
) -> MixingKernels:
    """The configured kernels (``RAT_KERNELS`` / ``RAT_ATTENTION`` override them) with ``auto``
    resolved for tensors on ``device`` and heads of ``head_dim`` channels."""
    scan = _override(KERNELS_ENV, scan, SCAN_KERNELS, "scan_kernel")
    attention = _override(ATTENTION_ENV, attention, ATTENTION_KERNELS, "attention_kernel")
    if not GPU_PROGRAMS:
        chosen = [f"{name}={value!r}" for name, value in (("scan_kernel", scan),
                  ("attention_kernel", attention)) if value not in ("auto", "torch")]
        if chosen:
            raise ValueError(f"{', '.join(chosen)}: this exported code carries the portable "
                             "kernels only: use auto or torch (or load the model with rat_plugin "
                             "installed for the GPU programs)")
        return MixingKernels(scan="torch", attention="torch")
    on_cuda = device.type == "cuda"
    small_heads = head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM
    if scan == "auto":
        scan = "triton" if on_cuda else "torch"
    if attention == "auto":
        attention = "flex" if on_cuda and scan != "torch" and not small_heads else "torch"
    elif attention.startswith("flex") and on_cuda and small_heads:
        raise ValueError(
            f"attention_kernel={attention!r} needs head_dim >= {FLEX_MIN_HEAD_DIM} on CUDA "
            f"(inductor's flex_attention), but heads have {head_dim} channels: use auto or torch"
        )
    return MixingKernels(scan=scan, attention=attention)

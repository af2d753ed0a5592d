"""One decode query per sequence against the first ``lengths[b]`` slots of a cache.

Every decode cache is laid out so that the slots a token may see are a prefix: RAT's chunk
summaries followed by its own running state, SWA's ring buffer (all of it once full), the full
KV cache. One kernel therefore serves all three: flash-attn's kv-cache kernel when it is
installed and the tensors are fp16/bf16 on CUDA (``rat_plugin.ops.flash_decode``), PyTorch SDPA
with a prefix mask otherwise. ``RAT_DECODE_ATTENTION`` (auto | sdpa | flash) forces either.
Neither reads anything back to the host, so a decode step can be captured in a CUDA graph.
"""

import os

import torch
import torch.nn.functional as F

from rat_plugin.ops.dispatch import GPU_PROGRAMS

DECODE_ENV = "RAT_DECODE_ATTENTION"
_CHOICES = ("auto", "sdpa", "flash")


def _flash_attn_importable() -> bool:
    if not GPU_PROGRAMS:
        return False
    try:  # optional extra: builds only with CUDA
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


FLASH_ATTN = _flash_attn_importable()


def decode_backend(q: torch.Tensor) -> str:
    """"flash" or "sdpa" for a decode query ``q``, following RAT_DECODE_ATTENTION."""
    choice = os.environ.get(DECODE_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{DECODE_ENV}={choice!r} is not one of {', '.join(_CHOICES)}")
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if choice == "flash":
        if not FLASH_ATTN or not usable:
            raise ValueError(
                f"{DECODE_ENV}=flash needs flash-attn installed and fp16/bf16 CUDA tensors with "
                f"head_dim <= 256 (got {q.dtype} on {q.device.type}); use {DECODE_ENV}=auto"
            )
        return "flash"
    if choice == "auto" and usable and FLASH_ATTN:
        return "flash"
    return "sdpa"


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of q (B, H, d) over keys/values (B, H, slots, d)[:, :, :lengths[b]].

    q and keys are already rotated; every length must be >= 1. Returns (B, H, d) in q's dtype.
    """
    if decode_backend(q) == "flash":
        from rat_plugin.ops.flash_decode import flash_decode

        return flash_decode(q, keys, values, lengths.to(torch.int32), scale)
    slots = keys.shape[2]
    visible = torch.arange(slots, device=q.device) < lengths[:, None]  # (B, slots)
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=visible[:, None, None], scale=scale
    )
    return out[:, :, 0]

"""``window_attention`` via flex_attention with a sliding-window BlockMask (the SWA layers' GPU
kernel): only the key blocks a query block can reach are computed, and no mask is evaluated
inside blocks wholly in the window. Full causal attention stays with SDPA (flash on CUDA),
except with packed documents (block-causal: flex with the document bounds)."""

import torch

from rat_plugin.ops.flex import flex, window_block_mask
from rat_plugin.ops.window_attention import window_attention


def flex_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    doc_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``window_attention``: (batch, heads, seq, head_dim), q and k rotated."""
    seq_len = q.shape[2]
    whole = window is None or window >= seq_len - 1
    if whole and doc_starts is None:
        return window_attention(q, k, v, window)
    mask = window_block_mask(seq_len, seq_len if whole else window, q.device, doc_starts)
    return flex(q)(q, k, v, block_mask=mask)

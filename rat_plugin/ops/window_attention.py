"""Causal (sliding-window) softmax attention for the SWA layers and the attention baseline."""

import torch
import torch.nn.functional as F


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    doc_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token t attends to tokens max(0, t - window)..t (window None: all earlier tokens).

    q, k, v: (batch, heads, seq, head_dim), q and k already rotated. Returns the same shape.
    doc_starts: (batch, seq) first position of each token's document, for packed documents
    (docs/design.md section 7): earlier keys are hidden too.
    A window shorter than the sequence runs block by block (blocks of ``window`` queries against
    the ``2 * window`` keys that can reach them): memory O(seq * window), not O(seq^2).
    """
    seq_len = q.shape[2]
    if window is None or window >= seq_len - 1:
        if doc_starts is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = torch.arange(seq_len, device=q.device)
        mask = (t[None, :] <= t[:, None]) & (t[None, None, :] >= doc_starts[:, :, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    batch, heads, _, head_dim = q.shape
    block = window
    num_blocks = -(-seq_len // block)
    pad = num_blocks * block - seq_len
    q = F.pad(q, (0, 0, 0, pad))
    # Keys/values get `window` zeros in front: block i sees padded rows
    # [i*block, i*block + block + window).
    k = F.pad(k, (0, 0, window, pad))
    v = F.pad(v, (0, 0, window, pad))
    span = block + window
    k = k.unfold(2, span, block).transpose(-1, -2)  # (B, H, blocks, span, d)
    v = v.unfold(2, span, block).transpose(-1, -2)
    q = q.view(batch, heads, num_blocks, block, head_dim)

    r = torch.arange(block, device=q.device)[:, None]  # query offset in its block
    j = torch.arange(span, device=q.device)[None, :]  # key offset in the block's key span
    first = torch.arange(num_blocks, device=q.device)[:, None, None] * block - window
    mask = (j >= r) & (j <= r + window) & (first + j >= 0)  # (blocks, block, span)
    if doc_starts is not None:  # (B, 1, blocks, block, span): one mask per sequence
        starts = F.pad(doc_starts, (0, pad)).view(batch, num_blocks, block, 1)
        mask = (mask & (first + j >= starts))[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.reshape(batch, heads, num_blocks * block, head_dim)[:, :, :seq_len]

    flat = (batch * heads, num_blocks)
    out = F.scaled_dot_product_attention(
        q.reshape(*flat, block, head_dim),
        k.reshape(*flat, span, head_dim),
        v.reshape(*flat, span, head_dim),
        attn_mask=mask,
    )
    return out.view(batch, heads, num_blocks * block, head_dim)[:, :, :seq_len]

"""Sliding-window attention (window None: full causal attention, the baseline mixer)."""

import torch
from torch import nn

from rat_plugin.model.cache import KVCache
from rat_plugin.ops.chunk_scan import accumulation_dtype
from rat_plugin.ops.decode_attention import decode_attention
from rat_plugin.ops.dispatch import select_kernels
from rat_plugin.ops.rope import apply_rope, rope_angles


class SlidingWindowAttention(nn.Module):
    """Multi-head attention where a token sees itself and the ``window`` previous tokens.

    Token-position RoPE, full-rank q/k/v, no output gate, no bias. ``kernel_choice`` is the
    model's (scan_kernel, attention_kernel): flex runs the window as a block-sparse kernel.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        window: int | None,
        rope_base: float,
        kernel_choice: tuple[str, str] = ("auto", "auto"),
    ):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window={window} must be >= 1 (or None for full attention)")
        self.head_dim = dim // n_heads
        self.window = window
        self.rope_base = rope_base
        self.kernel_choice = kernel_choice
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        # Set by the context-parallel plan: (q, k, v (B, H, T, d), positions (T,), window,
        # doc_starts) -> window attention over this rank's pieces plus the halo of tokens held
        # by other ranks.
        self.halo_attention = None

    def init_weights(self, std: float = 0.02) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(linear.weight, mean=0.0, std=std)

    def forward(
        self,
        u: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = u.shape
        q = self.wq(u).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(u).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(u).view(batch, seq_len, -1, self.head_dim)
        if cache is not None and cache.filled:
            token_pos = cache.pos[:, None]  # (B, 1)
        elif positions is not None and cache is None:
            token_pos = positions[0] if positions.dim() == 2 else positions
        else:
            token_pos = torch.arange(seq_len, device=u.device)
        acc = accumulation_dtype(q.dtype)
        cos, sin = rope_angles(token_pos, self.head_dim, self.rope_base, acc)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        q = apply_rope(q.to(acc), cos, sin).to(v.dtype)
        k = apply_rope(k.to(acc), cos, sin).to(v.dtype)

        if cache is not None and cache.filled:
            if seq_len != 1:
                raise ValueError(f"decode steps take one token per sequence, got {seq_len}")
            visible = cache.update(k[:, 0], v[:, 0])  # (B,) slots seen, a prefix
            out = decode_attention(
                q[:, 0].to(cache.dtype), cache.keys, cache.values, visible,
                scale=self.head_dim**-0.5,
            )[:, :, None].to(q.dtype)  # (B, H, 1, d)
        else:
            if cache is not None:
                cache.fill(k, v)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if self.halo_attention is not None and cache is None:
                out = self.halo_attention(q, k, v, token_pos, self.window, doc_starts)
            else:
                kernels = select_kernels(u.device, *self.kernel_choice, head_dim=self.head_dim)
                out = kernels.window_attention(q, k, v, self.window, doc_starts)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def new_cache(self, lengths: torch.Tensor, max_len: int) -> KVCache:
        return KVCache(lengths, max_len, self.window, self.wv.weight.dtype)

"""The RAT mixing core: chunk scan, chunk RoPE, attention over chunk summaries."""

from collections.abc import Callable

import torch

from rat_plugin.ops.chunk_scan import accumulation_dtype
from rat_plugin.ops.dispatch import MixingKernels, select_kernels
from rat_plugin.ops.rope import apply_rope, rope_angles

# (summary_k, summary_v, summary_chunk) -> the same, gathered over a context-parallel group.
SummaryExchange = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


def rat_mixing(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    forget_gate: torch.Tensor,
    chunk_size: int,
    rope_base: float = 10000.0,
    *,
    chunk_ids: torch.Tensor | None = None,
    summary_exchange: SummaryExchange | None = None,
    kernels: MixingKernels | None = None,
    first_chunks: torch.Tensor | None = None,
) -> torch.Tensor:
    """RAT token mixing (docs/design.md section 1, steps 3-5).

    q, k, v, forget_gate: (batch, seq, heads, head_dim); q and k expanded per head, the gate in
    (0, 1). Returns (batch, seq, heads, head_dim) in the dtype of q.

    chunk_ids (seq,) gives the global chunk index of each token when the sequence is a set of
    chunk-aligned pieces (context parallel); summary_exchange gathers chunk summaries from the
    other pieces. Both default to one whole sequence starting at position 0.
    kernels: the implementations (docs/design.md, "Kernel matrix"); default ``select_kernels``.
    first_chunks (batch, seq): for packed documents that start on chunk boundaries, the global
    chunk each token's document starts in; a token then sees no summary of an earlier document
    (docs/design.md section 7).
    """
    out, _, _ = rat_mixing_with_states(
        q, k, v, forget_gate, chunk_size, rope_base, chunk_ids=chunk_ids,
        summary_exchange=summary_exchange, kernels=kernels, first_chunks=first_chunks,
    )
    return out


def rat_mixing_with_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    forget_gate: torch.Tensor,
    chunk_size: int,
    rope_base: float = 10000.0,
    *,
    chunk_ids: torch.Tensor | None = None,
    summary_exchange: SummaryExchange | None = None,
    kernels: MixingKernels | None = None,
    first_chunks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rat_mixing`` that also returns the running states (kt unrotated, vt) for a decode cache."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    batch, seq_len, heads, head_dim = q.shape
    if chunk_ids is None:
        chunk_ids = torch.arange(seq_len, device=q.device) // chunk_size
    elif seq_len % chunk_size:
        raise ValueError(
            f"local seq_len={seq_len} is not a multiple of chunk_size={chunk_size}: "
            "context-parallel pieces must hold whole chunks"
        )
    acc = accumulation_dtype(q.dtype)
    kernels = kernels or select_kernels(q.device, head_dim=q.shape[-1])
    k_state, v_state = kernels.chunk_scan(k, v, forget_gate, chunk_size)  # (B, T, H, d), acc

    cos, sin = rope_angles(chunk_ids, head_dim, rope_base, acc)  # (T, d)
    cos, sin = cos[:, None], sin[:, None]
    q_rot = apply_rope(q.to(acc), cos, sin)
    k_state_rot = apply_rope(k_state, cos, sin)

    last = slice(chunk_size - 1, None, chunk_size)  # last offset of every whole chunk
    summary_k = k_state_rot[:, last]  # (B, N, H, d)
    summary_v = v_state[:, last]
    summary_chunk = chunk_ids[last]
    if summary_exchange is not None:
        summary_k, summary_v, summary_chunk = summary_exchange(summary_k, summary_v, summary_chunk)

    out = kernels.chunk_attention(
        q_rot.transpose(1, 2),
        k_state_rot.transpose(1, 2),
        v_state.transpose(1, 2),
        chunk_ids,
        summary_k.transpose(1, 2),
        summary_v.transpose(1, 2),
        summary_chunk,
        scale=head_dim**-0.5,
        query_first_chunk=first_chunks,
    )  # (B, H, T, d)
    return out.transpose(1, 2).to(q.dtype), k_state, v_state

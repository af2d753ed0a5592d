"""Softmax over earlier chunk summaries plus the token's own running state (DESIGN.md step 5)."""

import torch


def chunk_attention(
    q: torch.Tensor,
    k_state: torch.Tensor,
    v_state: torch.Tensor,
    query_chunk: torch.Tensor,
    summary_k: torch.Tensor,
    summary_v: torch.Tensor,
    summary_chunk: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One softmax per query over {summaries of chunks < its chunk} and its own state.

    q, k_state, v_state: (batch, heads, seq, head_dim); q and k_state already rotated.
    summary_k, summary_v: (batch, heads, num_summaries, head_dim); summary_k rotated.
    query_chunk: (seq,) or (batch, seq) chunk index of each query.
    summary_chunk: (num_summaries,) or (batch, num_summaries) chunk index of each summary.
    The own state is always in the softmax, so no row is ever fully masked (no NaN).
    Returns (batch, heads, seq, head_dim) in the dtype of q.
    """
    scores = torch.matmul(q, summary_k.transpose(-1, -2)) * scale  # (B, H, T, N)
    earlier = summary_chunk.unsqueeze(-2) < query_chunk.unsqueeze(-1)  # ([B,] T, N)
    if earlier.dim() == 3:
        earlier = earlier.unsqueeze(1)
    scores = scores.masked_fill(~earlier, float("-inf"))
    own = (q * k_state).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
    probs = torch.softmax(torch.cat((scores, own), dim=-1), dim=-1)
    num_summaries = summary_k.shape[-2]
    return torch.matmul(probs[..., :num_summaries], summary_v) + probs[..., num_summaries:] * v_state

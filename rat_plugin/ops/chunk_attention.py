"""Softmax over earlier chunk summaries plus the token's own running state (docs/design.md
section 1, step 5)."""

import torch

# Queries per block (fewer when the block's scores would exceed _BLOCK_ELEMENTS): small enough
# that skipping the summaries no query of a block sees saves about half the score matrix.
_BLOCK_QUERIES = 1024
_BLOCK_ELEMENTS = 1 << 22


def chunk_attention(
    q: torch.Tensor,
    k_state: torch.Tensor,
    v_state: torch.Tensor,
    query_chunk: torch.Tensor,
    summary_k: torch.Tensor,
    summary_v: torch.Tensor,
    summary_chunk: torch.Tensor,
    scale: float,
    query_first_chunk: torch.Tensor | None = None,
) -> torch.Tensor:
    """One softmax per query over {summaries of chunks < its chunk} and its own state.

    q, k_state, v_state: (batch, heads, seq, head_dim); q and k_state already rotated.
    summary_k, summary_v: (batch, heads, num_summaries, head_dim); summary_k rotated.
    query_chunk: (seq,) chunk index of each query.
    summary_chunk: (num_summaries,) chunk index of each summary, in any order.
    query_first_chunk: (batch, seq) first chunk of each query's document, for packed documents
    (docs/design.md section 7): summaries of earlier chunks are then hidden too.
    The own state is always in the softmax, so no row is ever fully masked (no NaN).
    Returns (batch, heads, seq, head_dim) in the dtype of q.

    Eager calls run query block by query block, flash-attention style: a block only scores the
    summaries some of its queries can see (half the score matrix for a whole sequence), the own
    state is merged by log-sum-exp, and the backward recomputes the scores instead of storing
    them. Under torch.compile the plain dense formula is traced instead. The forward mutates no
    op output (an activation-checkpointing policy may save any of them).
    """
    first = query_first_chunk
    if torch.compiler.is_compiling():
        return _dense_chunk_attention(
            q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, scale, first
        )
    unsorted = summary_chunk.numel() > 1 and bool((summary_chunk[1:] < summary_chunk[:-1]).any())
    if unsorted:  # e.g. gathered context-parallel pieces
        order = torch.argsort(summary_chunk, stable=True)
        summary_k, summary_v = summary_k[:, :, order], summary_v[:, :, order]
        summary_chunk = summary_chunk[order]
    blocks = _query_blocks(q.shape, query_chunk, summary_chunk, first)
    out = _BlockedChunkAttention.apply(
        q, k_state, v_state, summary_k, summary_v, query_chunk, summary_chunk, first, scale,
        blocks,
    )
    return out.to(q.dtype)


def _query_blocks(shape, query_chunk, summary_chunk, first) -> list[tuple[int, int, int, int]]:
    """(first query, end query, summaries all its queries see, summaries any of them sees).

    The summary chunks are sorted, so the visible summaries of a block are a prefix (within a
    prefix, with documents: then no summary counts as seen by all).
    """
    batch, heads, seq_len, _ = shape
    num_summaries = summary_chunk.shape[-1]
    size = max(16, min(_BLOCK_QUERIES, _BLOCK_ELEMENTS // max(1, batch * heads * num_summaries)))
    starts = list(range(0, seq_len, size))
    if num_summaries == 0:
        return [(s, min(s + size, seq_len), 0, 0) for s in starts]
    chunks = query_chunk.to(summary_chunk.dtype)
    block = torch.arange(seq_len, device=chunks.device) // size
    limits = chunks.new_zeros(2, len(starts))  # lowest and highest query chunk of each block
    limits[0].scatter_reduce_(0, block, chunks, "amin", include_self=False)
    limits[1].scatter_reduce_(0, block, chunks, "amax", include_self=False)
    bounds = torch.searchsorted(summary_chunk.contiguous(), limits)
    full, seen = bounds.tolist()
    if first is not None:
        full = [0] * len(starts)
    return [(s, min(s + size, seq_len), f, n) for s, f, n in zip(starts, full, seen)]


def _visible(query_chunk, summary_chunk, first=None) -> torch.Tensor:
    """Which summaries each query sees: (T, N), or (B, 1, T, N) with documents."""
    earlier = summary_chunk[None, :] < query_chunk[:, None]
    if first is None:
        return earlier
    return (earlier & (summary_chunk[None, None, :] >= first[:, :, None]))[:, None]


def _block_scores(q_scaled, summary_k, query_chunk, summary_chunk, first, start, end, full, seen):
    """Masked scores (B, H, block, seen) of queries start:end against the first seen summaries."""
    scores = torch.matmul(q_scaled[:, :, start:end], summary_k[:, :, :seen].transpose(-1, -2))
    if full < seen:
        block_first = None if first is None else first[:, start:end]
        hidden = ~_visible(query_chunk[start:end], summary_chunk[:seen], block_first)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


class _BlockedChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_state, v_state, summary_k, summary_v, query_chunk, summary_chunk, first,
                scale, blocks):
        # Contiguous (B, H, T, d) so query blocks feed matmul without copies.
        q, k_state, v_state, summary_k, summary_v = (
            x.contiguous() for x in (q, k_state, v_state, summary_k, summary_v)
        )
        q_scaled = q * scale
        own = (q_scaled * k_state).sum(-1)  # (B, H, T)
        out = torch.empty_like(v_state)
        lse = torch.empty_like(own)
        for start, end, full, seen in blocks:
            own_b, v_b = own[..., start:end], v_state[:, :, start:end]
            if seen == 0:  # only the own state: weight 1
                out[:, :, start:end] = v_b
                lse[..., start:end] = own_b
                continue
            scores = _block_scores(
                q_scaled, summary_k, query_chunk, summary_chunk, first, start, end, full, seen
            )
            top = torch.maximum(scores.amax(-1), own_b)  # finite: the own score is
            probs = torch.exp(scores - top[..., None])
            p_own = torch.exp(own_b - top)
            total = probs.sum(-1) + p_own
            block_out = torch.matmul(probs, summary_v[:, :, :seen]) + p_own[..., None] * v_b
            out[:, :, start:end] = block_out / total[..., None]
            lse[..., start:end] = top + total.log()
        ctx.save_for_backward(q, k_state, v_state, summary_k, summary_v, query_chunk,
                              summary_chunk, out, lse)
        ctx.scale, ctx.blocks, ctx.first = scale, blocks, first
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_state, v_state, summary_k, summary_v, query_chunk, summary_chunk, out, lse = (
            ctx.saved_tensors
        )
        scale = ctx.scale
        grad_out = grad_out.to(out.dtype).contiguous()
        q_scaled = q * scale
        delta = (grad_out * out).sum(-1)  # (B, H, T)
        # Own-state term, all queries at once.
        p_own = ((q_scaled * k_state).sum(-1) - lse).exp_()
        ds_own = p_own * ((grad_out * v_state).sum(-1) - delta)
        grad_q = k_state * (ds_own * scale)[..., None]
        grad_k_state = q_scaled * ds_own[..., None]
        grad_v_state = grad_out * p_own[..., None]
        grad_summary_k = torch.zeros_like(summary_k)
        grad_summary_v = torch.zeros_like(summary_v)
        for start, end, full, seen in ctx.blocks:
            if seen == 0:
                continue
            scores = _block_scores(
                q_scaled, summary_k, query_chunk, summary_chunk, ctx.first, start, end, full,
                seen,
            )
            probs = scores.sub_(lse[..., start:end, None]).exp_()  # masked entries -> 0
            grad_b = grad_out[:, :, start:end]
            grad_scores = torch.matmul(grad_b, summary_v[:, :, :seen].transpose(-1, -2))
            grad_scores.sub_(delta[..., start:end, None]).mul_(probs)
            grad_q[:, :, start:end].add_(
                torch.matmul(grad_scores, summary_k[:, :, :seen]), alpha=scale
            )
            grad_summary_k[:, :, :seen].add_(
                torch.matmul(grad_scores.transpose(-1, -2), q_scaled[:, :, start:end])
            )
            grad_summary_v[:, :, :seen].add_(torch.matmul(probs.transpose(-1, -2), grad_b))
        return (
            grad_q.to(q.dtype),
            grad_k_state.to(k_state.dtype),
            grad_v_state.to(v_state.dtype),
            grad_summary_k.to(summary_k.dtype),
            grad_summary_v.to(summary_v.dtype),
            None, None, None, None, None,
        )


def _dense_chunk_attention(
    q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, scale, first=None
):
    """The whole (seq x summaries) score matrix at once: the traceable formula for compile."""
    scores = torch.matmul(q, summary_k.transpose(-1, -2)) * scale  # (B, H, T, N)
    hidden = ~_visible(query_chunk, summary_chunk, first)
    scores = scores.masked_fill(hidden, float("-inf"))
    own = (q * k_state).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
    probs = torch.softmax(torch.cat((scores, own), dim=-1), dim=-1)
    num_summaries = summary_k.shape[-2]
    earlier_out = torch.matmul(probs[..., :num_summaries], summary_v)
    return earlier_out + probs[..., num_summaries:] * v_state

"""``chunk_attention`` via flex_attention over chunk summaries, merged with the own state.

flex_attention handles the block-sparse part (summary s is visible to query t iff its chunk is
earlier; the BlockMask comes from tensor ops, ``flex.chunk_block_mask``) and returns the
log-sum-exp of each row; the own-state logit is merged in by log-sum-exp. A row with no visible
summary (the first chunk) gets lse = -inf from flex, hence weight exactly 0, so its output is
exactly the own state and no NaN reaches values or gradients. Nothing here mutates a tensor, so
any activation-checkpointing policy may save any of these ops' outputs.
"""

import torch
from torch.nn.attention.flex_attention import AuxRequest

from rat_plugin.ops.flex import chunk_block_mask, flex


def flex_chunk_attention(
    q: torch.Tensor,
    k_state: torch.Tensor,
    v_state: torch.Tensor,
    query_chunk: torch.Tensor,
    summary_k: torch.Tensor,
    summary_v: torch.Tensor,
    summary_chunk: torch.Tensor,
    scale: float,
    query_first_chunk: torch.Tensor | None = None,
    flex_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as ``chunk_attention`` (shapes, chunk-index conventions, output dtype).

    flex_dtype: run flex on q and the summaries in this dtype (bf16: tensor cores) while the
    own-state logit and the merge stay in q's dtype.
    """
    own = (q * k_state).sum(-1) * scale  # (B, H, T)
    if summary_k.shape[-2] == 0:
        return v_state.to(q.dtype)
    q_flex, k_flex, v_flex = (t.to(flex_dtype or q.dtype) for t in (q, summary_k, summary_v))
    out, aux = flex(q)(
        q_flex, k_flex, v_flex,
        block_mask=chunk_block_mask(query_chunk, summary_chunk, query_first_chunk),
        scale=scale, return_aux=AuxRequest(lse=True),
    )
    out = out.to(q.dtype)
    lse = aux.lse.to(own.dtype)  # (B, H, T); -inf where no summary is visible
    top = torch.maximum(lse, own).detach()  # finite: own is finite
    w_summaries = torch.exp(lse - top).unsqueeze(-1)
    w_own = torch.exp(own - top).unsqueeze(-1)
    merged = (w_summaries * out + w_own * v_state) / (w_summaries + w_own)
    return merged.to(q.dtype)

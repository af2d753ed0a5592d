"""``chunk_attention`` via flex_attention over chunk summaries, merged with the own state.

flex_attention handles the block-sparse part (summary s is visible to query t iff its chunk is
earlier) and returns the log-sum-exp of each row; the own-state logit is merged in by log-sum-exp.
A row with no visible summary (the first chunk) gets lse = -inf from flex, hence weight exactly 0,
so its output is exactly the own state and no NaN reaches values or gradients.

On CUDA flex_attention is compiled (fused Triton kernels). On CPU it runs eagerly; torch refuses
flex_attention backward on CPU, so this path is forward-only there (the portable
``chunk_attention`` is the CPU training path).
"""

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device):
    # Compiled CPU flex has neither backward nor lse: eager there, compiled on GPUs.
    return flex_attention if device.type == "cpu" else _compiled_flex()


def flex_chunk_attention(
    q: torch.Tensor,
    k_state: torch.Tensor,
    v_state: torch.Tensor,
    query_chunk: torch.Tensor,
    summary_k: torch.Tensor,
    summary_v: torch.Tensor,
    summary_chunk: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as ``chunk_attention`` (shapes, chunk-index conventions, output dtype)."""
    seq_len = q.shape[2]
    own = (q * k_state).sum(-1) * scale  # (B, H, T)
    num_summaries = summary_k.shape[-2]
    if num_summaries == 0:
        return v_state.to(q.dtype)

    def earlier(b, h, q_idx, kv_idx):
        return summary_chunk[kv_idx] < query_chunk[q_idx]

    block_mask = create_block_mask(earlier, None, None, seq_len, num_summaries, device=q.device)
    out, aux = _flex(q.device)(
        q, summary_k, summary_v, block_mask=block_mask, scale=scale,
        return_aux=AuxRequest(lse=True),
    )
    lse = aux.lse  # (B, H, T); -inf where no summary is visible
    top = torch.maximum(lse, own).detach()  # finite: own is finite
    w_summaries = torch.exp(lse - top).unsqueeze(-1)
    w_own = torch.exp(own - top).unsqueeze(-1)
    merged = (w_summaries * out + w_own * v_state) / (w_summaries + w_own)
    return merged.to(q.dtype)

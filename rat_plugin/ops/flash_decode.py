"""flash-attn's kv-cache kernel as the decode attention (``rat_plugin.ops.decode_attention``).

The flash-attn call is wrapped in the custom op ``rat_titan::flash_decode``: dynamo cannot trace
a raw extension call, but it can an opaque op, so ``torch.compile(fullgraph=True)`` of a decode
step works with either backend.
"""

import torch

try:  # optional extra: builds only with CUDA
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


@torch.library.custom_op("rat_titan::flash_decode", mutates_args=())
def flash_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """flash-attn's kv-cache kernel over the first ``lengths`` (int32) slots: q (B, H, d),
    caches (B, H, slots, d) -> (B, H, d)."""
    out = flash_attn_with_kvcache(
        q[:, None],  # (B, 1, H, d)
        keys.transpose(1, 2),  # (B, slots, H, d) views: flash reads them by stride
        values.transpose(1, 2),
        cache_seqlens=lengths,
        softmax_scale=scale,
        causal=False,
    )
    return out[:, 0].contiguous()


@flash_decode.register_fake
def _(q, keys, values, lengths, scale):
    return torch.empty_like(q)

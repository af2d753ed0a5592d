"""What every flex_attention call of ours needs: its BlockMask, and which flex to call.

BlockMasks come from tensor ops, so they trace inside compiled, checkpointed blocks.

torch's ``create_block_mask`` evaluates the mask over the whole (queries x keys) grid inside a
torch-function mode, which dynamo cannot trace inside activation checkpointing, and materialises
that grid. Both masks here have a block structure that follows from per-block bounds of the
indices alone, so it is computed in O(query blocks x key blocks) with plain tensor ops. A block
is "full" (no mask evaluated inside) only when every pair in it is visible and it lies wholly
inside both sequences; a block with some visible pair is "partial"; other blocks are skipped.
That is exactly the split ``create_block_mask`` computes (tests/test_flex_kernels.py).

Which flex runs (``flex``): inside a compiled region, flex_attention itself (traced into the
caller's graph, fused there); eager on CUDA, one ``torch.compile`` of flex with dynamic shapes
that raises instead of falling back to the unfused kernel; eager elsewhere, torch's reference
implementation (torch refuses its backward on CPU: docs/design.md, "Kernel matrix").
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # flex_attention's default sparse block size, queries and keys
# Compiles of the eager callers' flex: dynamic shapes leave one per grad mode, dtype and size-1
# specialisation (batch 1, a single block), far fewer than this.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled_flex(backend="inductor"):
    """flex_attention compiled with dynamic shapes, so new lengths and batch sizes reuse it.
    Hitting the recompile limit raises: the silent alternative, dynamo's fallback to the unfused
    reference kernel, materialises (B, H, T, keys) fp32 scores (64 GiB per sequence for RAT at
    T = 128K)."""
    compiled = torch.compile(flex_attention, dynamic=True, fullgraph=True, backend=backend)

    @functools.wraps(flex_attention)
    def call(*args, **kwargs):
        limits = dict(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)
        with torch._dynamo.config.patch(**limits):
            return compiled(*args, **kwargs)

    return call


def flex(q: torch.Tensor):
    """The flex_attention to call for query ``q`` (see the module docstring)."""
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention
    return compiled_flex()


def chunk_block_mask(query_chunk: torch.Tensor, summary_chunk: torch.Tensor) -> BlockMask:
    """Summary s is visible to query t iff summary_chunk[s] < query_chunk[t] (any order)."""
    q_low, q_high = _block_bounds(query_chunk)
    s_low, s_high = _block_bounds(summary_chunk)
    every = s_high[None, :] < q_low[:, None]  # (query blocks, summary blocks)
    some = s_low[None, :] < q_high[:, None]

    def earlier(b, h, q_idx, kv_idx):
        return summary_chunk[kv_idx] < query_chunk[q_idx]

    return _block_mask(every, some, earlier, query_chunk.numel(), summary_chunk.numel())


def window_block_mask(seq_len: int, window: int, device: torch.device) -> BlockMask:
    """Key j is visible to query i iff i - window <= j <= i (causal sliding window)."""
    first = torch.arange(0, seq_len, BLOCK, device=device)  # first index of every block
    last = (first + BLOCK - 1).clamp(max=seq_len - 1)
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
    every = (k_last <= q_first) & (k_first >= q_last - window)
    some = (k_first <= q_last) & (k_last >= q_first - window)

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= q_idx - window)

    return _block_mask(every, some, in_window, seq_len, seq_len)


def _block_bounds(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest value of every block of BLOCK entries (the last may be short)."""
    pad = -index.numel() % BLOCK
    if pad:  # repeat the last entry: it changes neither bound
        index = torch.cat((index, index[-1:].expand(pad)))
    blocks = index.view(-1, BLOCK)
    return blocks.amin(-1), blocks.amax(-1)


def _block_mask(every, some, mask_mod, q_len: int, kv_len: int) -> BlockMask:
    """BlockMask from (query blocks, key blocks) flags: every pair visible / some pair visible."""
    whole_q = torch.arange(every.shape[0], device=every.device) < q_len // BLOCK
    whole_kv = torch.arange(every.shape[1], device=every.device) < kv_len // BLOCK
    full = every & whole_q[:, None] & whole_kv[None, :]
    partial = some & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, rows) counts and (1, 1, rows, cols) column indices, flagged columns first."""
    flags = flags.to(torch.int32)[None, None]
    counts = flags.sum(-1, dtype=torch.int32)
    indices = torch.argsort(flags, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices

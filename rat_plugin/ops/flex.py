"""What every flex_attention call of ours needs: its BlockMask, and which flex to call.

BlockMasks come from tensor ops, so they trace inside compiled, checkpointed blocks.

torch's ``create_block_mask`` evaluates the mask over the whole (queries x keys) grid inside a
torch-function mode, which dynamo cannot trace inside activation checkpointing, and materialises
that grid. Both masks here have a block structure that follows from per-block bounds of the
indices alone, so it is computed in O(query blocks x key blocks) with plain tensor ops. A block
is "full" (no mask evaluated inside) only when every pair in it is visible and it lies wholly
inside both sequences; a block with some visible pair is "partial"; other blocks are skipped.
That is exactly the split ``create_block_mask`` computes (tests/test_flex_attention.py). With
packed documents (per-row bounds on the keys a query may see) the masks get a batch dimension
and a block may be listed as partial although none of its pairs is visible: never the reverse.

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


def chunk_block_mask(
    query_chunk: torch.Tensor, summary_chunk: torch.Tensor, first: torch.Tensor | None = None
) -> BlockMask:
    """Summary s is visible to query t iff summary_chunk[s] < query_chunk[t] (any order) and,
    with documents, summary_chunk[s] >= first[b, t] (its document's first chunk)."""
    q_low, q_high = _block_bounds(query_chunk)
    s_low, s_high = _block_bounds(summary_chunk)
    every = s_high[None, :] < q_low[:, None]  # (query blocks, summary blocks)
    some = s_low[None, :] < q_high[:, None]

    def earlier(b, h, q_idx, kv_idx):
        return summary_chunk[kv_idx] < query_chunk[q_idx]

    mask_mod = earlier
    if first is not None:
        every, some, mask_mod = _in_document(every, some, earlier, first, s_low, s_high,
                                             summary_chunk)
    return _block_mask(every, some, mask_mod, query_chunk.numel(), summary_chunk.numel())


def window_block_mask(
    seq_len: int, window: int, device: torch.device, doc_starts: torch.Tensor | None = None
) -> BlockMask:
    """Key j is visible to query i iff i - window <= j <= i (causal sliding window) and, with
    documents, j >= doc_starts[b, i] (its document's first position)."""
    first = torch.arange(0, seq_len, BLOCK, device=device)  # first index of every block
    last = (first + BLOCK - 1).clamp(max=seq_len - 1)
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
    every = (k_last <= q_first) & (k_first >= q_last - window)
    some = (k_first <= q_last) & (k_last >= q_first - window)

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= q_idx - window)

    mask_mod = in_window
    if doc_starts is not None:
        keys = torch.arange(seq_len, device=device)
        every, some, mask_mod = _in_document(every, some, in_window, doc_starts, first, last,
                                             keys)
    return _block_mask(every, some, mask_mod, seq_len, seq_len)


def _in_document(every, some, mask_mod, lowest, key_low, key_high, key_index):
    """Add "key index >= lowest[b, query]" to block flags (Qb, Kb) and a mask_mod: the flags
    get a batch dimension; ``key_low`` / ``key_high`` bound each key block's index."""
    low, high = _block_bounds(lowest)  # (B, Qb)
    every = every & (key_low[None, None, :] >= high[:, :, None])  # (B, Qb, Kb)
    some = some & (key_high[None, None, :] >= low[:, :, None])

    def in_document(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (key_index[kv_idx] >= lowest[b, q_idx])

    return every, some, in_document


def _block_bounds(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest value of every block of BLOCK entries along the last dimension (the
    last block may be short)."""
    pad = -index.shape[-1] % BLOCK
    if pad:  # repeat the last entry: it changes neither bound
        index = torch.cat((index, index[..., -1:].expand(*index.shape[:-1], pad)), dim=-1)
    blocks = index.unflatten(-1, (-1, BLOCK))
    return blocks.amin(-1), blocks.amax(-1)


def _block_mask(every, some, mask_mod, q_len: int, kv_len: int) -> BlockMask:
    """BlockMask from ([batch,] query blocks, key blocks) flags: every pair visible / some pair
    visible."""
    whole_q = torch.arange(every.shape[-2], device=every.device) < q_len // BLOCK
    whole_kv = torch.arange(every.shape[-1], device=every.device) < kv_len // BLOCK
    full = every & whole_q[:, None] & whole_kv[None, :]
    partial = some & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B or 1, 1, rows) counts and (B or 1, 1, rows, cols) column indices, flagged columns
    first."""
    flags = flags.to(torch.int32)
    flags = flags[:, None] if flags.dim() == 3 else flags[None, None]
    counts = flags.sum(-1, dtype=torch.int32)
    indices = torch.argsort(flags, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices

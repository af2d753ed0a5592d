"""Decode-cache size per sequence (docs/design.md section 3), from the shapes alone."""

import torch

from rat_plugin.model import RATModelArgs


def layer_cache_bytes(args: RATModelArgs, layer_id: int, position: int, dtype: torch.dtype) -> int:
    """Bytes one sequence's cache of layer ``layer_id`` holds after ``position`` tokens.

    RAT: 2*H*d values per chunk so far (ceil(P/L) slots: the closed chunks' summaries and the
    current chunk's rotated running state) in ``dtype``, plus the 2*H*d running state in fp32.
    Attention: 2*H*d*P. Sliding window W: 2*H*d*min(P, W+1).
    """
    per_token = 2 * args.n_heads * args.head_dim
    kind = args.layer_mixer(layer_id)
    if kind == "rat":
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        chunks = -(-position // args.chunk_size)
        return per_token * (chunks * dtype.itemsize + state_dtype.itemsize)
    held = position if kind == "attention" else min(position, args.swa_window + 1)
    return per_token * held * dtype.itemsize


def cache_bytes(args: RATModelArgs, position: int, dtype: torch.dtype) -> int:
    """Bytes of all layers' caches for one sequence after ``position`` tokens."""
    return sum(layer_cache_bytes(args, i, position, dtype) for i in range(args.n_layers))

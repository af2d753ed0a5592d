"""Decode-cache size per sequence (docs/design.md section 3), from the shapes alone, and whether a
generation's caches fit the device's free memory."""

import os

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


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} PiB"


def free_bytes(device: torch.device) -> int:
    """What a new allocation on ``device`` can take: CUDA's free memory plus the blocks PyTorch
    holds unused; on the CPU, the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_fits(
    args: RATModelArgs, batch: int, prompt_len: int, max_new_tokens: int, dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Refuse a ``max_new_tokens`` whose decode caches (``batch`` sequences of up to
    ``prompt_len + max_new_tokens - 1`` tokens) exceed the device's free memory."""

    def need(new_tokens: int) -> int:
        return batch * cache_bytes(args, prompt_len + new_tokens - 1, dtype)

    free = free_bytes(device)
    if need(max_new_tokens) <= free:
        return
    low, high = 0, max_new_tokens  # need(low) fits or low is 0, need(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= free else (low, mid)
    raise ValueError(
        f"max_new_tokens={max_new_tokens} needs {human_bytes(need(max_new_tokens))} of decode "
        f"cache for {batch} sequence(s), but {device.type} has {human_bytes(free)} free: at "
        f"most {low} new tokens fit; lower max_new_tokens or the batch"
    )

"""Intra-chunk gated linear recurrence (DESIGN.md section 1, step 3)."""

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def chunk_scan(
    k: torch.Tensor, v: torch.Tensor, forget_gate: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running keys and values, state reset to zero at every chunk start.

    kt_s = g_s * kt_{s-1} + (1 - g_s) * k_s (same for v), accumulated in fp32 (fp64 for fp64).
    All inputs are (batch, seq, heads, head_dim); seq need not be a multiple of chunk_size.
    Returns (kt, vt) in the accumulation dtype, same shape as k.

    Vectorised over chunks; the only Python loop runs over the chunk_size offsets.
    """
    batch, seq_len, heads, head_dim = k.shape
    acc = accumulation_dtype(k.dtype)
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    # Keys and values share the gate: scan them together over the last dim.
    x = torch.cat((k, v), dim=-1).to(acc)
    gate = forget_gate.to(acc).repeat(1, 1, 1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        gate = F.pad(gate, (0, 0, 0, 0, 0, pad))
    x = x.view(batch, num_chunks, chunk_size, heads, 2 * head_dim)
    gate = gate.view(batch, num_chunks, chunk_size, heads, 2 * head_dim)

    state = x[:, :, 0] * (1 - gate[:, :, 0])  # previous state is zero at each chunk start
    states = [state]
    for offset in range(1, chunk_size):
        # g * state + (1 - g) * x
        state = torch.lerp(x[:, :, offset], state, gate[:, :, offset])
        states.append(state)
    running = torch.stack(states, dim=2).view(batch, num_chunks * chunk_size, heads, 2 * head_dim)
    running = running[:, :seq_len]
    return running[..., :head_dim], running[..., head_dim:]

"""Intra-chunk gated linear recurrence (docs/design.md section 1, step 3): the reference scan.

``chunk_scan`` is the portable path; ``chunk_scan_backward`` is its gradient as a plain function,
the CPU body of the Triton custom op's backward (``triton_chunk_scan``).
"""

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

    Vectorised over chunks; the only Python loop runs over the chunk_size offsets, forward and
    (hand-written, so autograd never zero-fills a full-size gradient per offset) backward.
    Under torch.compile the same recurrence runs as plain traceable ops (the eager Function
    writes into views with ``out=``, which dynamo cannot trace), so fullgraph compile works.
    """
    x = _pairs(k, v, chunk_size)
    gate = _gate(forget_gate, x.dtype, chunk_size)
    scan = _traced_scan if torch.compiler.is_compiling() else _ChunkScan.apply
    running = scan(x, gate, chunk_size)[:, : k.shape[1]]
    return running.unbind(-2)


def chunk_scan_backward(
    grad_kt: torch.Tensor,
    grad_vt: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    forget_gate: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dk, dv, dgate), in the input dtypes, of ``chunk_scan``'s outputs (kt, vt)
    whose gradients are (grad_kt, grad_vt): the reverse scan inside every chunk."""
    x, grad, out = (_pairs(a, b, chunk_size) for a, b in ((k, v), (grad_kt, grad_vt), (kt, vt)))
    gate = _gate(forget_gate, x.dtype, chunk_size)
    dx, dgate = _reverse_scan(*(_by_offset(t, chunk_size) for t in (grad, x, gate, out)))
    seq_len = k.shape[1]
    dk, dv = dx.flatten(1, 2)[:, :seq_len].unbind(-2)
    dgate = dgate.flatten(1, 2)[:, :seq_len].squeeze(-2)
    return dk.to(k.dtype), dv.to(v.dtype), dgate.to(forget_gate.dtype)


def _pairs(a: torch.Tensor, b: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, T, H, d) pair -> (B, T', H, 2, d) in the accumulation dtype, T' whole chunks: keys and
    values share the gate, so they are scanned together."""
    acc = accumulation_dtype(a.dtype)
    return _pad_to_chunks(torch.stack((a.to(acc), b.to(acc)), dim=-2), chunk_size)


def _gate(forget_gate: torch.Tensor, dtype: torch.dtype, chunk_size: int) -> torch.Tensor:
    """(B, T, H, d) -> (B, T', H, 1, d), broadcasting over the key/value pair."""
    return _pad_to_chunks(forget_gate.to(dtype).unsqueeze(-2), chunk_size)


def _pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    pad = -x.shape[1] % chunk_size
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x


def _by_offset(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, T, ...) -> contiguous (B, C, L, ...); [:, :, s] is offset s of every chunk.
    Contiguity matters: with a (B, H, T, d) memory layout every offset slice is scattered."""
    return x.contiguous().view(x.shape[0], -1, chunk_size, *x.shape[2:])


def _traced_scan(x: torch.Tensor, gate: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """_ChunkScan's forward as out-of-place ops; autograd derives the backward."""
    x, gate = _by_offset(x, chunk_size), _by_offset(gate, chunk_size)
    state = x[:, :, 0] * (1 - gate[:, :, 0])
    states = [state]
    for s in range(1, chunk_size):
        state = torch.lerp(x[:, :, s], state, gate[:, :, s])
        states.append(state)
    return torch.stack(states, dim=2).flatten(1, 2)


class _ChunkScan(torch.autograd.Function):
    """The scan of stacked keys/values (B, T, H, 2, d) over whole chunks, with its reverse scan
    as the backward."""

    @staticmethod
    def forward(ctx, x, gate, chunk_size):
        x, gate = _by_offset(x, chunk_size), _by_offset(gate, chunk_size)
        out = torch.empty_like(x)
        # The previous state is zero at each chunk start: (1 - g) * x.
        torch.mul(x[:, :, 0], 1 - gate[:, :, 0], out=out[:, :, 0])
        for s in range(1, chunk_size):
            # lerp(x, state, g) = g * state + (1 - g) * x
            torch.lerp(x[:, :, s], out[:, :, s - 1], gate[:, :, s], out=out[:, :, s])
        ctx.save_for_backward(x, gate, out)
        return out.flatten(1, 2)

    @staticmethod
    def backward(ctx, grad):
        x, gate, out = ctx.saved_tensors
        dx, dgate = _reverse_scan(_by_offset(grad, gate.shape[2]), x, gate, out)
        return dx.flatten(1, 2), dgate.flatten(1, 2), None


def _reverse_scan(grad, x, gate, out):
    """(dx, dgate) by offset (B, C, L, ...) from the gradient of the states ``out`` of the scan
    of ``x`` with ``gate``. Hand-written, so autograd never zero-fills a full-size gradient per
    offset."""
    chunk_size = gate.shape[2]
    one_minus = 1 - gate
    dx = torch.mul(grad, one_minus)  # the direct term; the carried term is added below
    dgate = torch.empty_like(gate)
    carry = None  # gradient reaching state s from state s + 1
    for s in range(chunk_size - 1, -1, -1):
        if carry is None:
            total = grad[:, :, s]
        else:
            total = grad[:, :, s] + carry
            dx[:, :, s].addcmul_(carry, one_minus[:, :, s])
        # d state_s / d g_s = state_{s-1} - x_s
        diff = out[:, :, s - 1] - x[:, :, s] if s else x[:, :, 0].neg()
        torch.sum(total * diff, dim=-2, keepdim=True, out=dgate[:, :, s])
        carry = total * gate[:, :, s]
    return dx, dgate

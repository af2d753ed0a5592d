"""Triton kernels for the intra-chunk gated recurrence: exactly the ``chunk_scan`` contract.

One program per (batch * chunk, head, block of head_dim channels) walks the chunk's offsets with
the running key/value state held in registers (fp32 accumulation, fp64 for fp64 inputs), so k, v
and the gate are read once and the running states written once. The backward kernel runs the
reverse scan within each chunk. Both are registered as ``torch.library.triton_op`` custom ops
(``rat_titan::chunk_scan_fwd`` / ``_bwd``) so ``torch.compile(fullgraph=True)`` traces them into
Triton kernel nodes on CUDA.

Off CUDA the same ops run a CPU body, the reference scan (``chunk_scan`` / ``chunk_scan_backward``):
the op, its autograd formula and its place in a compiled, checkpointed graph are those of the GPU
program, so CPU CI executes that program (docs/design.md, "Kernel matrix"). With
``TRITON_INTERPRET=1`` set before this module is imported, eager calls on CPU run the Triton
kernels themselves in Triton's interpreter (tests only: slow; a compiled graph cannot launch them).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rat_plugin.ops.chunk_scan import accumulation_dtype, chunk_scan, chunk_scan_backward


@triton.jit
def _program_chunk(seq_len, heads, head_dim, num_chunks, CHUNK: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """This program's channels, its chunk's first token, and the element offsets of those
    channels at that token (grid: batch * chunks, heads, head_dim blocks)."""
    pid_bc = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    batch = pid_bc // num_chunks
    start = (pid_bc % num_chunks) * CHUNK
    base = ((batch.to(tl.int64) * seq_len + start) * heads + head) * head_dim + dims
    return dims, start, base


@triton.jit
def _scan_fwd_kernel(
    k_ptr, v_ptr, g_ptr, kt_ptr, vt_ptr,
    seq_len, heads, head_dim, num_chunks,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    dims, start, base = _program_chunk(seq_len, heads, head_dim, num_chunks, CHUNK, BLOCK_D)
    step = heads * head_dim  # elements between consecutive tokens
    state_k = tl.zeros([BLOCK_D], dtype=ACC)
    state_v = tl.zeros([BLOCK_D], dtype=ACC)
    for s in range(CHUNK):
        mask = dims < tl.where(start + s < seq_len, head_dim, 0)  # partial last chunk
        offs = base + s * step
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        state_k = g * state_k + (1 - g) * x_k
        state_v = g * state_v + (1 - g) * x_v
        tl.store(kt_ptr + offs, state_k.to(kt_ptr.dtype.element_ty), mask=mask)
        tl.store(vt_ptr + offs, state_v.to(vt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_bwd_kernel(
    dkt_ptr, dvt_ptr, k_ptr, v_ptr, g_ptr, kt_ptr, vt_ptr, dk_ptr, dv_ptr, dg_ptr,
    seq_len, heads, head_dim, num_chunks,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    dims, start, base = _program_chunk(seq_len, heads, head_dim, num_chunks, CHUNK, BLOCK_D)
    step = heads * head_dim
    # grad_k / grad_v: total gradient reaching the running state at offset s (from s and later).
    grad_k = tl.zeros([BLOCK_D], dtype=ACC)
    grad_v = tl.zeros([BLOCK_D], dtype=ACC)
    g_next = tl.zeros([BLOCK_D], dtype=ACC)
    for i in range(CHUNK):
        s = CHUNK - 1 - i
        mask = dims < tl.where(start + s < seq_len, head_dim, 0)  # partial last chunk
        offs = base + s * step
        grad_k = tl.load(dkt_ptr + offs, mask=mask, other=0.0).to(ACC) + g_next * grad_k
        grad_v = tl.load(dvt_ptr + offs, mask=mask, other=0.0).to(ACC) + g_next * grad_v
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        has_prev = dims < tl.where((start + s < seq_len) & (s > 0), head_dim, 0)  # state(-1) = 0
        prev_k = tl.load(kt_ptr + offs - step, mask=has_prev, other=0.0).to(ACC)
        prev_v = tl.load(vt_ptr + offs - step, mask=has_prev, other=0.0).to(ACC)
        tl.store(dk_ptr + offs, ((1 - g) * grad_k).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + offs, ((1 - g) * grad_v).to(dv_ptr.dtype.element_ty), mask=mask)
        grad_g = grad_k * (prev_k - x_k) + grad_v * (prev_v - x_v)
        tl.store(dg_ptr + offs, grad_g.to(dg_ptr.dtype.element_ty), mask=mask)
        g_next = g


INTERPRETED = not isinstance(_scan_fwd_kernel, triton.runtime.JITFunction)
# Tensors on these devices launch the kernels; elsewhere the ops run their CPU body.
TRITON_DEVICES = ("cuda",)


def _launches_kernels(t: torch.Tensor) -> bool:
    """Triton on CUDA, or in the interpreter for eager CPU calls; else the CPU body."""
    return t.device.type in TRITON_DEVICES or (INTERPRETED and not torch.compiler.is_compiling())


# scan_kernel = "triton_autotune": block width x warps, chosen per (head_dim, chunk size) by
# timing on the GPU, as flash-linear-attention's hgrn kernels do. Unmeasured: see
# docs/gpu_fast_path.md for the H100 comparison against the fixed choice.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_D": block_d}, num_warps=warps)
    for block_d in (16, 32, 64, 128)
    for warps in (1, 2, 4)
]
_TUNED = {
    kernel: triton.autotune(AUTOTUNE_CONFIGS, key=["head_dim", "CHUNK"])(kernel)
    for kernel in (_scan_fwd_kernel, _scan_bwd_kernel)
}
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _unaliased(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The CPU body's results as fresh tensors: a custom op's outputs may not alias each other
    (the reference returns views of one stacked buffer)."""
    return tuple(t.clone() for t in tensors)


def _fixed_config(head_dim: int) -> triton.Config:
    """The block width and warp count without autotuning."""
    block_d = min(triton.next_power_of_2(head_dim), 64)
    return triton.Config({"BLOCK_D": block_d}, num_warps=max(1, block_d // 32))


def _launch(kernel, autotune: bool, k: torch.Tensor, chunk_size: int, *tensors, acc) -> None:
    """Run ``kernel`` over the grid (batch * chunks, heads, head_dim blocks), with the fixed
    block width and warp count or the autotuned ones."""
    batch, seq_len, heads, head_dim = k.shape
    head_dim = int(head_dim)  # under dynamic shapes a symbolic one broke Triton's codegen
    num_chunks = triton.cdiv(seq_len, chunk_size)
    options = {}
    if not autotune:
        config = _fixed_config(head_dim)
        options = dict(config.kwargs, num_warps=config.num_warps)

    def grid(meta):
        return batch * num_chunks, heads, triton.cdiv(head_dim, meta["BLOCK_D"])

    kernel = _TUNED[kernel] if autotune else kernel
    # The interpreter's kernels (eager CPU calls, never traced) run unwrapped: what torch 2.13's
    # wrap_triton returns for them; torch 2.11's refuses them.
    launch = kernel if INTERPRETED else wrap_triton(kernel)
    launch[grid](*tensors, seq_len, heads, head_dim, num_chunks, CHUNK=chunk_size, ACC=acc,
                 **options)


@triton_op("rat_titan::chunk_scan_fwd", mutates_args=())
def _chunk_scan_fwd(
    k: torch.Tensor, v: torch.Tensor, forget_gate: torch.Tensor, chunk_size: int, autotune: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _launches_kernels(k):
        return _unaliased(chunk_scan(k, v, forget_gate, chunk_size))
    k, v, forget_gate = k.contiguous(), v.contiguous(), forget_gate.contiguous()
    acc = accumulation_dtype(k.dtype)
    kt = torch.empty(k.shape, dtype=acc, device=k.device)
    vt = torch.empty(k.shape, dtype=acc, device=k.device)
    _launch(_scan_fwd_kernel, autotune, k, chunk_size, k, v, forget_gate, kt, vt,
            acc=_TL_DTYPES[acc])
    return kt, vt


@triton_op("rat_titan::chunk_scan_bwd", mutates_args=())
def _chunk_scan_bwd(
    grad_kt: torch.Tensor,
    grad_vt: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    forget_gate: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    chunk_size: int,
    autotune: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _launches_kernels(k):
        return _unaliased(
            chunk_scan_backward(grad_kt, grad_vt, k, v, forget_gate, kt, vt, chunk_size)
        )
    grad_kt, grad_vt = grad_kt.contiguous(), grad_vt.contiguous()
    k, v, forget_gate = k.contiguous(), v.contiguous(), forget_gate.contiguous()
    kt, vt = kt.contiguous(), vt.contiguous()  # the kernel indexes (B, T, H, d) row-major
    grad_k = torch.empty_like(k)
    grad_v = torch.empty_like(v)
    grad_g = torch.empty_like(forget_gate)
    _launch(_scan_bwd_kernel, autotune, k, chunk_size, grad_kt, grad_vt, k, v, forget_gate, kt,
            vt, grad_k, grad_v, grad_g, acc=_TL_DTYPES[kt.dtype])
    return grad_k, grad_v, grad_g


def _setup_context(ctx, inputs, output) -> None:
    k, v, forget_gate, chunk_size, autotune = inputs
    kt, vt = output
    ctx.save_for_backward(k, v, forget_gate, kt, vt)
    ctx.chunk_size, ctx.autotune = chunk_size, autotune


def _backward(ctx, grad_kt, grad_vt):
    k, v, forget_gate, kt, vt = ctx.saved_tensors
    grad_kt = torch.zeros_like(kt) if grad_kt is None else grad_kt
    grad_vt = torch.zeros_like(vt) if grad_vt is None else grad_vt
    grad_k, grad_v, grad_g = _chunk_scan_bwd(
        grad_kt.to(kt.dtype), grad_vt.to(vt.dtype), k, v, forget_gate, kt, vt, ctx.chunk_size,
        ctx.autotune,
    )
    return grad_k, grad_v, grad_g, None, None


_chunk_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_chunk_scan(
    k: torch.Tensor,
    v: torch.Tensor,
    forget_gate: torch.Tensor,
    chunk_size: int,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``chunk_scan``: same arguments, same (kt, vt) in the accumulation dtype.
    ``autotune``: block width and warps from AUTOTUNE_CONFIGS instead of the fixed choice."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if k.dim() != 4 or v.shape != k.shape or forget_gate.shape != k.shape:
        raise ValueError(
            f"k, v, forget_gate must all be (batch, seq, heads, head_dim); got "
            f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(forget_gate.shape)}"
        )
    return _chunk_scan_fwd(k, v, forget_gate, chunk_size, autotune)

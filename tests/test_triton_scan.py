"""Triton chunk-scan kernels (forward + backward) against the portable ``chunk_scan``.

On a CUDA machine the kernel tests run on the GPU. Without one, ``test_kernels_under_interpreter``
re-runs this file in a subprocess with TRITON_INTERPRET=1 (Triton reads it when the kernels are
defined, so it must be set before import; the subprocess keeps it out of every other test).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

from oracle import assert_matches_loop_oracle
from rat_plugin.ops import chunk_scan, rat_mixing
from rat_plugin.ops import triton_chunk_scan as triton_module
from rat_plugin.ops.triton_chunk_scan import triton_chunk_scan

CUDA = torch.cuda.is_available()
INTERPRETED = triton_module.INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1 (see the interpreter test)"
)

SHAPES = [  # (B, T, H, d, L)
    pytest.param(2, 19, 2, 16, 8, id="partial-last-chunk"),
    pytest.param(1, 16, 2, 8, 16, id="L=T"),
    pytest.param(2, 5, 2, 8, 1, id="L=1"),
    pytest.param(1, 5, 2, 8, 16, id="shorter-than-a-chunk"),
    pytest.param(1, 9, 1, 80, 4, id="two-dim-blocks"),  # head_dim 80: blocks of 64, masked tail
]
# Both paths accumulate in fp32 (fp64); bf16 grads differ by bf16 rounding of the final cast.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def scan_inputs(batch, seq_len, heads, head_dim, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)
    k, v = (torch.randn(shape, generator=gen) for _ in range(2))
    gate = torch.rand(shape, generator=gen) * 0.98 + 0.01
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (k, v, gate)]


def mixing_inputs(batch, seq_len, heads, head_dim, dtype, device=DEVICE):
    """q, k, v, gate for rat_mixing."""
    (q,) = scan_inputs(batch, seq_len, heads, head_dim, dtype, seed=1, device=device)[:1]
    return [q, *scan_inputs(batch, seq_len, heads, head_dim, dtype, device=device)]


def values_and_grads(scan, inputs, chunk_size, use=(True, True)):
    kt, vt = scan(*inputs, chunk_size)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(kt.shape, generator=gen, dtype=kt.dtype).to(kt.device) for _ in range(2)]
    loss = sum((out * w).sum() for out, w, used in zip((kt, vt), weights, use) if used)
    return (kt.detach(), vt.detach()), torch.autograd.grad(loss, inputs)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,seq_len,heads,head_dim,chunk_size", SHAPES)
def test_matches_portable_scan(batch, seq_len, heads, head_dim, chunk_size, dtype):
    inputs = scan_inputs(batch, seq_len, heads, head_dim, dtype)
    outs, grads = values_and_grads(triton_chunk_scan, inputs, chunk_size)
    ref_outs, ref_grads = values_and_grads(chunk_scan, inputs, chunk_size)
    for got, want in zip(outs, ref_outs):
        assert got.dtype == want.dtype  # the accumulation dtype, as the portable path returns
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    for name, got, want in zip(("k", "v", "gate"), grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype], msg=name)


@needs_kernels
def test_unused_output_and_strided_inputs():
    """Only vt feeds the loss, and the inputs are non-contiguous views."""
    base = scan_inputs(2, 11, 4, 8, torch.float64)
    inputs = [t.detach()[:, :, ::2].requires_grad_() for t in base]  # every other head: strided
    assert not inputs[0].is_contiguous()
    outs, grads = values_and_grads(triton_chunk_scan, inputs, 4, use=(False, True))
    ref_outs, ref_grads = values_and_grads(chunk_scan, inputs, 4, use=(False, True))
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))


@needs_kernels
def test_rat_mixing_through_triton_matches_loop_oracle(monkeypatch):
    monkeypatch.setenv("RAT_KERNELS", "triton")
    inputs = mixing_inputs(2, 13, 2, 8, torch.float64)  # L=4: partial last chunk
    assert_matches_loop_oracle(rat_mixing, inputs, 4)


def test_rejects_mismatched_shapes():
    k, v, gate = scan_inputs(1, 4, 1, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="forget_gate must all be"):
        triton_chunk_scan(k, v, gate[..., :4], 2)
    with pytest.raises(ValueError, match="chunk_size=0"):
        triton_chunk_scan(k, v, gate, 0)


@pytest.mark.skipif(CUDA or INTERPRETED, reason="CPU without the interpreter only")
def test_cpu_without_interpreter_gives_a_clear_error():
    k, v, gate = scan_inputs(1, 4, 1, 8, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_chunk_scan(k, v, gate, 2)


class _StopAfterTrace(Exception):
    pass


@pytest.mark.skipif(CUDA or INTERPRETED, reason="CPU trace check (CUDA compiles for real)")
def test_fullgraph_compile_traces_the_triton_ops(monkeypatch):
    """Dynamo (fullgraph) + AOTAutograd trace rat_mixing's forward and backward into the Triton
    kernel ops, as on CUDA. Without a GPU driver the kernels cannot run, so the compiled graph
    stops after tracing; the dispatch and device guards are lifted for CPU tensors."""
    monkeypatch.setenv("RAT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only read by the dispatch; kernels stay compiled
    monkeypatch.setattr(triton_module, "INTERPRETED", True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def stop(*args):
            raise _StopAfterTrace

        return stop

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(rat_mixing, fullgraph=True, backend=backend)
    inputs = mixing_inputs(1, 8, 2, 8, torch.float32, device="cpu")
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
        with pytest.raises(_StopAfterTrace):
            compiled(*inputs, 4)
    kernels = [  # dynamo stores the launch options with the kernel as a one-config Autotuner
        kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn
        for gm in graphs
        for node in gm.graph.nodes
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional
    ]
    assert kernels == [triton_module._scan_fwd_kernel, triton_module._scan_bwd_kernel]


@pytest.mark.skipif(not CUDA, reason="CUDA only")
def test_compiled_bf16_mixing_on_cuda_matches_eager_portable(monkeypatch):
    inputs = [t.detach() for t in mixing_inputs(2, 64, 4, 64, torch.bfloat16)]
    out = torch.compile(rat_mixing, fullgraph=True)(*inputs, 16)  # auto: Triton scan + flex
    monkeypatch.setenv("RAT_KERNELS", "torch")
    torch.testing.assert_close(out, rat_mixing(*inputs, 16), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="CUDA only")
def test_custom_op_registration_on_cuda():
    inputs = scan_inputs(2, 19, 2, 16, torch.float32)  # requires grad: checks autograd too
    torch.library.opcheck(torch.ops.rat_titan.chunk_scan_fwd.default, (*inputs, 8))


@pytest.mark.skipif(CUDA or INTERPRETED, reason="runs this file under the interpreter on CPU")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= len(SHAPES) * 3 + 3, report

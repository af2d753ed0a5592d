"""Triton chunk-scan kernels (forward + backward) against the portable ``chunk_scan``, and the
custom ops around them.

On a CUDA machine the kernel tests run on the GPU. Without one, ``test_kernels_under_interpreter``
re-runs this file in a subprocess with TRITON_INTERPRET=1 (Triton reads it when the kernels are
defined, so it must be set before import; the subprocess keeps it out of every other test). On
plain CPU the same custom ops run their CPU body (eager and compiled), and the compiled trace of
the CUDA program is checked with the kernels' device rule widened to CPU.
"""

import functools
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
from rat_plugin.ops.dispatch import MixingKernels
from rat_plugin.ops.triton_chunk_scan import triton_chunk_scan

CUDA = torch.cuda.is_available()
INTERPRETED = triton_module.INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1 (see the interpreter test)"
)
cpu_body = pytest.mark.skipif(CUDA or INTERPRETED, reason="plain CPU: the custom ops' CPU body")
# Compiled graphs launch real kernels: interpreted ones cannot run inside them.
compiled_cuda = pytest.mark.skipif(not CUDA or INTERPRETED, reason="CUDA only, not interpreted")
TRITON_SCAN = MixingKernels("triton", "torch")

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
@pytest.mark.parametrize(
    "config", triton_module.AUTOTUNE_CONFIGS,
    ids=lambda c: f"BLOCK_D={c.kwargs['BLOCK_D']}-warps={c.num_warps}",
)
def test_every_autotune_config_matches_portable_scan(config, monkeypatch):
    """scan_kernel=triton_autotune picks one of these on the GPU: each must be exact (head_dim
    80 leaves a masked tail for every width but 16)."""
    monkeypatch.setattr(triton_module, "_fixed_config", lambda head_dim: config)
    inputs = scan_inputs(1, 9, 2, 80, torch.float32)
    outs, grads = values_and_grads(triton_chunk_scan, inputs, 4)
    ref_outs, ref_grads = values_and_grads(chunk_scan, inputs, 4)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def triton_mixing(*args, **kwargs):
    return rat_mixing(*args, kernels=TRITON_SCAN, **kwargs)


def test_rat_mixing_through_the_scan_op_matches_loop_oracle():
    """The Triton kernels (CUDA, interpreter) or the op's CPU body, against the loop oracle."""
    inputs = mixing_inputs(2, 13, 2, 8, torch.float64)  # L=4: partial last chunk
    assert_matches_loop_oracle(triton_mixing, inputs, 4)


@cpu_body
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_scan_op_on_cpu_matches_loop_oracle(dynamic):
    """The custom ops traced by dynamo + AOTAutograd (their CPU body lowered eagerly)."""
    compiled = torch.compile(triton_mixing, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for seq_len in (13, 21):  # a second length: no failure with dynamic shapes
        inputs = mixing_inputs(2, seq_len, 2, 8, torch.float64)
        assert_matches_loop_oracle(compiled, inputs, 4)


def test_rejects_mismatched_shapes():
    k, v, gate = scan_inputs(1, 4, 1, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="forget_gate must all be"):
        triton_chunk_scan(k, v, gate[..., :4], 2)
    with pytest.raises(ValueError, match="chunk_size=0"):
        triton_chunk_scan(k, v, gate, 0)


class _StopAfterTrace(Exception):
    pass


def trace_cuda_program(monkeypatch, inputs, dynamic: bool, kernels=TRITON_SCAN):
    """The triton_kernel_wrapper nodes of rat_mixing's forward and backward graphs, traced by
    dynamo (fullgraph) + AOTAutograd as on CUDA: the ops' device rule is widened to CPU so they
    launch the kernels. Without a GPU driver the kernels cannot run, so the graphs stop after
    tracing."""
    monkeypatch.setattr(triton_module, "TRITON_DEVICES", ("cuda", "cpu"))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def stop(*args):
            raise _StopAfterTrace

        return stop

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(functools.partial(rat_mixing, kernels=kernels), fullgraph=True,
                             dynamic=dynamic, backend=backend)
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
        with pytest.raises(_StopAfterTrace):
            compiled(*inputs, 4)
    return [
        node
        for gm in graphs
        for node in gm.graph.nodes
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional
    ]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="CPU trace check (CUDA compiles for real)")
def test_fullgraph_compile_traces_the_triton_ops(monkeypatch):
    """rat_mixing's forward and backward graphs hold exactly the two Triton kernels."""
    nodes = trace_cuda_program(monkeypatch, mixing_inputs(1, 8, 2, 8, torch.float32, "cpu"),
                               dynamic=False)
    kernels = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn for node in nodes]
    assert kernels == [triton_module._scan_fwd_kernel, triton_module._scan_bwd_kernel]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="CPU trace check (CUDA compiles for real)")
def test_autotuned_scan_traces_into_the_autotuner(monkeypatch):
    """scan_kernel=triton_autotune: both graphs launch the autotuner over AUTOTUNE_CONFIGS."""
    nodes = trace_cuda_program(monkeypatch, mixing_inputs(1, 8, 2, 8, torch.float32, "cpu"),
                               dynamic=False, kernels=MixingKernels("triton_autotune", "torch"))
    tuners = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]) for node in nodes]
    assert [tuner.fn for tuner in tuners] == [
        triton_module._scan_fwd_kernel, triton_module._scan_bwd_kernel
    ]
    assert all(tuner.configs == triton_module.AUTOTUNE_CONFIGS for tuner in tuners)


@pytest.mark.skipif(CUDA or INTERPRETED, reason="CPU trace check (CUDA compiles for real)")
def test_dynamic_compile_passes_head_dim_as_an_int(monkeypatch):
    """Under dynamic=True the launch keeps the length symbolic but head_dim, the block width
    and the chunk size are Python ints: a symbolic head_dim reached triton.next_power_of_2 and
    broke inductor's codegen of the kernel."""
    inputs = mixing_inputs(1, 12, 2, 8, torch.float32, "cpu")  # 12 != 8: no shared symbol
    nodes = trace_cuda_program(monkeypatch, inputs, dynamic=True)
    assert len(nodes) == 2
    for node in nodes:
        constants = node.kwargs["kwargs"]
        assert {k: constants[k] for k in ("head_dim", "BLOCK_D", "CHUNK")} == dict(
            head_dim=8, BLOCK_D=8, CHUNK=4
        )
        assert isinstance(constants["seq_len"], torch.fx.Node)  # still dynamic


@compiled_cuda
@pytest.mark.parametrize("seq_len", [64, 300])  # below and above flex's 128-query block
def test_compiled_bf16_mixing_on_cuda_matches_eager_portable(seq_len):
    inputs = [t.detach() for t in mixing_inputs(2, seq_len, 4, 64, torch.bfloat16)]
    compiled = torch.compile(rat_mixing, fullgraph=True)
    out = compiled(*inputs, 16, kernels=MixingKernels("triton", "flex"))
    portable = rat_mixing(*inputs, 16, kernels=MixingKernels("torch", "torch"))
    torch.testing.assert_close(out, portable, rtol=2e-2, atol=2e-2)


@compiled_cuda
def test_custom_op_registration_on_cuda():
    inputs = scan_inputs(2, 19, 2, 16, torch.float32)  # requires grad: checks autograd too
    torch.library.opcheck(torch.ops.rat_titan.chunk_scan_fwd.default, (*inputs, 8, False))


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
    configs = len(triton_module.AUTOTUNE_CONFIGS)
    assert passed and int(passed.group(1)) >= len(SHAPES) * 3 + configs + 3, report

"""flex_chunk_attention against the portable chunk_attention (eager flex on CPU, compiled on CUDA).

torch refuses flex_attention backward on CPU with a device guard, although its eager (dense
reference) forward and backward run there. For the gradient tests on CPU we lift that guard only
inside the test, to check our block mask and log-sum-exp merge (incl. the gradient through the
lse) against the portable path; on CUDA the real fused flex kernels run instead.
"""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from oracle import assert_matches_loop_oracle
from rat_plugin.ops import rat_mixing
from rat_plugin.ops.chunk_attention import chunk_attention
from rat_plugin.ops.flex_chunk_attention import flex_chunk_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _cpu_flex_backward(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def make_inputs(batch, heads, seq_len, chunk_size, head_dim, dtype, device, logit_scale=1.0):
    gen = torch.Generator().manual_seed(seq_len * 31 + head_dim)
    num_summaries = seq_len // chunk_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()

    q = rand(batch, heads, seq_len, head_dim)
    with torch.no_grad():
        q.mul_(logit_scale)
    tensors = (
        q,
        rand(batch, heads, seq_len, head_dim),
        rand(batch, heads, seq_len, head_dim),
        rand(batch, heads, num_summaries, head_dim),
        rand(batch, heads, num_summaries, head_dim),
    )
    query_chunk = torch.arange(seq_len, device=device) // chunk_size
    summary_chunk = torch.arange(num_summaries, device=device)
    return tensors, query_chunk, summary_chunk


def run_both(tensors, query_chunk, summary_chunk):
    q, k_state, v_state, summary_k, summary_v = tensors
    scale = q.shape[-1] ** -0.5
    results = []
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=q.dtype)
    for fn in (flex_chunk_attention, chunk_attention):
        out = fn(q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, scale)
        grads = torch.autograd.grad((out * weights.to(q.device)).sum(), tensors)
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq_len,chunk_size", [(24, 4), (13, 3), (8, 8), (5, 1)])
def test_matches_portable_values_and_grads(device, dtype, seq_len, chunk_size):
    tensors, query_chunk, summary_chunk = make_inputs(2, 3, seq_len, chunk_size, 16, dtype, device)
    (out, grads), (ref, ref_grads) = run_both(tensors, query_chunk, summary_chunk)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_chunk_ids(device):
    """Pieces from non-contiguous chunks and summaries gathered out of order, as CP sends."""
    tensors, _, _ = make_inputs(2, 2, 8, 2, 16, torch.float64, device)
    query_chunk = torch.tensor([0, 0, 1, 1, 6, 6, 7, 7], device=device)
    summary_chunk = torch.tensor([6, 1, 7, 0], device=device)
    (out, grads), (ref, ref_grads) = run_both(tensors, query_chunk, summary_chunk)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_first_chunk_rows_are_exactly_the_own_state(device):
    tensors, query_chunk, summary_chunk = make_inputs(1, 2, 12, 4, 16, torch.float32, device)
    q, k_state, v_state, summary_k, summary_v = tensors
    out = flex_chunk_attention(
        q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, 16**-0.5
    )
    assert torch.equal(out[:, :, :4], v_state[:, :, :4])
    out.sum().backward()
    for tensor in tensors:
        assert torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_summaries_gives_the_own_state(device):
    tensors, query_chunk, summary_chunk = make_inputs(1, 2, 3, 4, 16, torch.float32, device)
    q, k_state, v_state, summary_k, summary_v = tensors
    assert summary_k.shape[-2] == 0
    out = flex_chunk_attention(
        q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, 16**-0.5
    )
    assert torch.equal(out, v_state)


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_stay_finite(device):
    """Logits around 1e4: a naive exp would overflow; the lse merge must not give inf or NaN."""
    tensors, query_chunk, summary_chunk = make_inputs(
        1, 2, 16, 4, 16, torch.float64, device, logit_scale=3e3
    )
    (out, grads), (ref, ref_grads) = run_both(tensors, query_chunk, summary_chunk)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rat_mixing_with_flex_matches_loop_oracle(device, monkeypatch):
    """RAT_ATTENTION=flex routes rat_mixing through flex; values and grads match the oracle."""
    monkeypatch.setenv("RAT_ATTENTION", "flex")
    gen = torch.Generator().manual_seed(3)
    shape = (2, 21, 2, 16)  # L=4: five whole chunks and a partial one
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))
    gate = torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    inputs = [t.to(device).requires_grad_() for t in (q, k, v, gate)]
    assert_matches_loop_oracle(rat_mixing, inputs, 4)

"""The flex kernels: BlockMasks from tensor ops against torch's create_block_mask,
flex_chunk_attention against the portable chunk_attention, flex_window_attention against the
portable window_attention, and the compiled flex that eager CUDA callers use.

torch refuses flex_attention backward on CPU with a device guard, although its eager (dense
reference) forward and backward run there. For the gradient tests on CPU we lift that guard only
inside the test, to check our block masks and log-sum-exp merge (incl. the gradient through the
lse) against the portable path; on CUDA the real fused flex kernels run instead. The reference
implementation evaluates the mask_mod densely and ignores the block structure, so the block
structure is checked on its own, against create_block_mask. Shapes span T < 128 (flex's decoding
kernel on CUDA) and T > 128 (the training kernel, several query blocks). Compiled flex
accumulates in fp32, so fp64 cases run on CPU only.
"""

import itertools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from oracle import assert_matches_loop_oracle
from rat_plugin.ops import rat_mixing
from rat_plugin.ops.chunk_attention import chunk_attention
from rat_plugin.ops.dispatch import MixingKernels
from rat_plugin.ops import flex as flex_module
from rat_plugin.ops.flex import chunk_block_mask, compiled_flex, window_block_mask
from rat_plugin.ops.flex_chunk_attention import flex_chunk_attention
from rat_plugin.ops.flex_window_attention import flex_window_attention
from rat_plugin.ops.window_attention import window_attention

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("cpu_flex_backward"),
]
# The CUDA cases are collected everywhere (skipped without CUDA), so the GPU check's dry run
# lists them (tools/gpu_check_stages/cuda_tests.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def skip_cuda_fp64(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("compiled flex accumulates in fp32: no fp64 on CUDA")


BLOCK_MASK_FIELDS = ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks")


def assert_same_block_mask(got, want):
    """Same blocks, split the same way into full and partial ones, same lengths."""
    assert got.seq_lengths == want.seq_lengths
    assert got.BLOCK_SIZE == want.BLOCK_SIZE
    for name in BLOCK_MASK_FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for counts, indices in (("kv_num_blocks", "kv_indices"),
                            ("full_kv_num_blocks", "full_kv_indices"),
                            ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        count = getattr(got, counts)[..., None]
        listed = torch.arange(getattr(got, indices).shape[-1]) < count
        width = listed.shape[-1]
        want_indices = getattr(want, indices)[..., :width]
        assert torch.equal(getattr(got, indices)[listed], want_indices[listed])
    assert torch.equal(got.to_dense(), want.to_dense())


@pytest.mark.parametrize(
    "seq_len,chunk_size", [(100, 16), (256, 16), (300, 16), (1000, 4), (513, 1)]
)
def test_chunk_block_mask_is_create_block_mask(seq_len, chunk_size):
    query_chunk = torch.arange(seq_len) // chunk_size
    summary_chunk = torch.arange(seq_len // chunk_size)
    for summaries in (summary_chunk, summary_chunk[torch.randperm(len(summary_chunk))]):
        want = create_block_mask(lambda b, h, q, kv: summaries[kv] < query_chunk[q], None, None,
                                 seq_len, len(summaries), device="cpu")
        assert_same_block_mask(chunk_block_mask(query_chunk, summaries), want)


def block_sets(block_mask):
    """(blocks listed at all, blocks listed as full), dense (B, H, Qb, Kb) booleans."""
    num, indices = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    full = torch.zeros(*indices.shape, dtype=torch.bool)  # Kb = indices' last dimension
    for row in itertools.product(*map(range, num.shape)):
        full[row][indices[row][: num[row]].long()] = True
    return block_mask.to_dense().bool(), full


def test_document_block_masks_cover_create_block_mask():
    """With packed documents the masks are per sequence: every block create_block_mask lists is
    listed, and a block is full only if create_block_mask calls it full."""
    seq_len, chunk_size = 600, 16
    starts = torch.zeros(2, seq_len, dtype=torch.long)
    for row, cuts in enumerate([[64, 160, 400], [16, 32, 320]]):
        for cut in cuts:
            starts[row, cut:] = cut
    query_chunk, summary_chunk = torch.arange(seq_len) // chunk_size, torch.arange(37)
    first = starts // chunk_size
    cases = [
        (chunk_block_mask(query_chunk, summary_chunk, first),
         lambda b, h, q, kv: (summary_chunk[kv] < query_chunk[q])
         & (summary_chunk[kv] >= first[b, q]),
         len(summary_chunk)),
        (window_block_mask(seq_len, 64, torch.device("cpu"), starts),
         lambda b, h, q, kv: (kv <= q) & (kv >= q - 64) & (kv >= starts[b, q]), seq_len),
    ]
    for mine, mask_mod, keys in cases:
        want = create_block_mask(mask_mod, 2, None, seq_len, keys, device="cpu")
        (listed, full), (want_listed, want_full) = block_sets(mine), block_sets(want)
        assert bool((listed | ~want_listed).all()) and bool((want_full | ~full).all())
        assert listed.shape[0] == 2  # one mask per sequence


@pytest.mark.parametrize(
    "seq_len,window", [(130, 1), (256, 64), (300, 64), (1000, 200), (2048, 1024)]
)
def test_window_block_mask_is_create_block_mask(seq_len, window):
    want = create_block_mask(lambda b, h, q, kv: (kv <= q) & (kv >= q - window), None, None,
                             seq_len, seq_len, device="cpu")
    assert_same_block_mask(window_block_mask(seq_len, window, torch.device("cpu")), want)


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seq_len,chunk_size", [(24, 4), (13, 3), (8, 8), (5, 1), (300, 16), (256, 4)]
)
def test_matches_portable_values_and_grads(device, dtype, seq_len, chunk_size):
    skip_cuda_fp64(device, dtype)
    tensors, query_chunk, summary_chunk = make_inputs(2, 3, seq_len, chunk_size, 16, dtype, device)
    (out, grads), (ref, ref_grads) = run_both(tensors, query_chunk, summary_chunk)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_chunk_ids(device):
    """Pieces from non-contiguous chunks and summaries gathered out of order, as CP sends:
    two pieces of 96 tokens (chunks 0-5 and 18-23 of L = 16) and 12 shuffled summaries."""
    dtype = torch.float32 if device == "cuda" else torch.float64
    tensors, _, _ = make_inputs(2, 2, 192, 16, 16, dtype, device)
    query_chunk = torch.cat((torch.arange(96) // 16, 18 + torch.arange(96) // 16)).to(device)
    summary_chunk = torch.cat((torch.arange(6), 18 + torch.arange(6)))
    summary_chunk = summary_chunk[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    (out, grads), (ref, ref_grads) = run_both(tensors, query_chunk, summary_chunk.to(device))
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=TOL[dtype], rtol=TOL[dtype])


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


@pytest.mark.parametrize("device", ["cpu"])  # fp64: a logit of 1e4 in fp32 has ulp 1e-3
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
def test_rat_mixing_with_flex_matches_loop_oracle(device):
    """attention_kernel=flex routes rat_mixing through flex; values and grads match the oracle."""
    dtype = torch.float32 if device == "cuda" else torch.float64
    gen = torch.Generator().manual_seed(3)
    shape = (2, 21, 2, 16)  # L=4: five whole chunks and a partial one
    q, k, v = (torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(3))
    gate = torch.rand(*shape, generator=gen, dtype=dtype) * 0.98 + 0.01
    inputs = [t.to(device).requires_grad_() for t in (q, k, v, gate)]

    def flex_mixing(*args):
        return rat_mixing(*args, kernels=MixingKernels("torch", "flex"))

    atol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_matches_loop_oracle(flex_mixing, inputs, 4, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len,window", [(100, 7), (300, 64), (300, 200), (256, 1), (40, 64)])
def test_window_attention_matches_portable(device, dtype, seq_len, window):
    """The SWA layers' flex kernel against the portable blocked SDPA, values and grads."""
    skip_cuda_fp64(device, dtype)
    gen = torch.Generator().manual_seed(seq_len + window)
    q, k, v = (torch.randn(2, 3, seq_len, 16, generator=gen, dtype=dtype).to(device)
               .requires_grad_() for _ in range(3))
    weight = torch.randn(q.shape, generator=gen, dtype=dtype).to(device)
    results = []
    for attention in (flex_window_attention, window_attention):
        out = attention(q, k, v, window)
        results.append((out, *torch.autograd.grad((out * weight).sum(), (q, k, v))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.fixture
def fresh_dynamo():
    """Compile counts and limits are per code object: start without other tests' entries."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def flex_inputs(batch, seq_len, dtype=torch.float32):
    q, k, v = (torch.randn(batch, 2, seq_len, 16, dtype=dtype) for _ in range(3))
    return q, k, v, window_block_mask(seq_len, 8, q.device)


@torch.no_grad()
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_flex_stops_recompiling():
    """Eager callers on CUDA (generation prefill, benchmarks, training without compile) share one
    dynamic compile: after the first shapes, new lengths and batch sizes add no compile (eight
    static compiles used to make dynamo give up and run the unfused kernel). Checked with the
    aot_eager backend on CPU."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compiled_flex(counter)

    def run(shapes):
        for batch, seq_len in shapes:
            q, k, v, block_mask = flex_inputs(batch, seq_len)
            got = compiled(q, k, v, block_mask=block_mask)
            torch.testing.assert_close(got, flex_attention(q, k, v, block_mask=block_mask))

    run([(3, 130), (4, 300), (5, 257)])
    warm = counter.frame_count
    run([(3, 700), (6, 1000), (4, 520), (7, 390), (3, 1300)])
    assert counter.frame_count == warm <= 3


@torch.no_grad()
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_flex_never_falls_back_silently(monkeypatch):
    """Past the recompile limit the compiled flex raises instead of running the unfused
    reference kernel."""
    monkeypatch.setattr(flex_module, "RECOMPILE_LIMIT", 1)
    compiled = compiled_flex(CompileCounterWithBackend("aot_eager"))
    q, k, v, block_mask = flex_inputs(3, 130)
    compiled(q, k, v, block_mask=block_mask)
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # a new dtype recompiles
        compiled(q.double(), k.double(), v.double(), block_mask=block_mask)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_bf16_keeps_the_merge_in_fp32(device):
    """attention_kernel=flex_bf16: flex over bf16 queries and summaries, the own state and the
    merge in fp32. Within bf16 rounding of the fp32 result, and really rounded (not fp32)."""
    tensors, query_chunk, summary_chunk = make_inputs(2, 3, 300, 16, 32, torch.float32, device)
    scale = 32**-0.5
    weights = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(0))
    results = []
    for flex_dtype in (torch.bfloat16, None):
        out = flex_chunk_attention(*tensors[:3], query_chunk, *tensors[3:], summary_chunk, scale,
                                   flex_dtype=flex_dtype)
        grads = torch.autograd.grad((out * weights.to(device)).sum(), tensors)
        results.append((out, *grads))
    assert results[0][0].dtype == torch.float32
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)
    for got, want in zip(results[0][1:], results[1][1:]):  # sums over many bf16 products
        assert (got - want).norm() <= 1e-2 * want.norm()
    assert not torch.equal(results[0][0], results[1][0])
    first_chunk = results[0][0][:, :, :16]  # no summary visible: exactly the fp32 own state
    assert torch.equal(first_chunk, tensors[2][:, :, :16])

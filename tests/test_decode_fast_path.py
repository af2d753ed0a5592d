"""The decode fast path: one prefix-masked attention kernel for every cache (SDPA, or
flash-attn's kv-cache kernel), caches updated in place at fixed addresses, a decode step with no
host sync (fullgraph compile, no recompiles), and the CUDA-graph decode step.

flash-attn and CUDA graphs need a GPU: on CPU the flash glue runs against an independent
reference of flash_attn_with_kvcache's documented contract, the graph protocol (warm-up and
capture must not advance the caches) against a stand-in capture; the real ones run on CUDA."""

import importlib

import pytest
import torch

from rat_plugin.generate import generate
from rat_plugin.generate.step import DecodeStep
from rat_plugin.model import RATModel, make_args
from rat_plugin.ops.decode_attention import DECODE_ENV, decode_attention, decode_backend

# The modules whose attributes the tests replace (by path: a package may re-export a name).
decode_module = importlib.import_module("rat_plugin.ops.decode_attention")
flash_module = importlib.import_module("rat_plugin.ops.flash_decode")
step_module = importlib.import_module("rat_plugin.generate.step")

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["rat", "rat_swa", "rat_attn"]
WINDOW = 8
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def build(kind: str, device="cpu", dtype=torch.float32) -> RATModel:
    torch.manual_seed(0)
    window = {"swa_window": WINDOW} if kind.endswith("swa") else {}  # else all RAT / attention
    args = make_args(kind, "debugmodel", dim=64, n_layers=2, ffn_hidden_dim=128,
                     vocab_size=512, max_seq_len=64, **window)
    model = RATModel(args)
    model.init_weights()
    return model.to(device=device, dtype=dtype).eval()


def loop_attention(q, keys, values, lengths, scale):
    """One softmax per (sequence, head) over its first lengths[b] slots, written as loops."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lengths[b])
        for h in range(q.shape[1]):
            weights = torch.softmax(keys[b, h, :n] @ q[b, h] * scale, dim=0)
            out[b, h] = weights @ values[b, h, :n]
    return out


def test_sdpa_decode_attention_matches_loop():
    gen = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(s, generator=gen, dtype=torch.float64)
                       for s in [(4, 3, 8), (4, 3, 11, 8), (4, 3, 11, 8)])
    lengths = torch.tensor([1, 5, 11, 2])
    got = decode_attention(q, keys, values, lengths, scale=0.3)
    torch.testing.assert_close(got, loop_attention(q, keys, values, lengths, 0.3),
                               rtol=0, atol=1e-12)


def reference_flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, softmax_scale,
                                      causal):
    """flash_attn_with_kvcache's contract as documented: q (B, 1, H, d), caches (B, S, H, d)
    with a contiguous last dimension, int32 cache_seqlens; returns (B, 1, H, d)."""
    assert q.shape[1] == 1 and not causal
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == q.shape[:1]
    out = loop_attention(q[:, 0], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                         cache_seqlens, softmax_scale)
    return out[:, None]


@pytest.mark.parametrize("kind", KINDS)
def test_flash_glue_decodes_like_sdpa(kind, monkeypatch):
    """Whole-model decoding through the flash-attn call equals the SDPA path step for step."""
    model = build(kind)
    prompts = [[3, 4, 5], list(range(1, 20)), [7] * 40]

    def run():
        return generate(model, prompts, max_new_tokens=20, return_logits=True)

    sdpa = run()
    monkeypatch.setattr(decode_module, "decode_backend", lambda q: "flash")
    monkeypatch.setattr(flash_module, "flash_attn_with_kvcache", reference_flash_attn_with_kvcache)
    flash = run()
    assert flash.tokens == sdpa.tokens
    for a, b in zip(flash.logits, sdpa.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_decode_backend_choice(monkeypatch):
    q = torch.zeros(1, 1, 8)
    assert decode_backend(q) == "sdpa"  # auto off CUDA
    monkeypatch.setenv(DECODE_ENV, "sdpa")
    assert decode_backend(q) == "sdpa"
    monkeypatch.setenv(DECODE_ENV, "flash")
    with pytest.raises(ValueError, match="RAT_DECODE_ATTENTION=flash needs flash-attn installed"):
        decode_backend(q)
    monkeypatch.setenv(DECODE_ENV, "fast")
    with pytest.raises(ValueError, match="RAT_DECODE_ATTENTION='fast' is not one of auto"):
        decode_backend(q)


def cache_tensors(caches) -> list[torch.Tensor]:
    names = ("keys", "values", "pos", "state_k", "state_v")
    return [getattr(c, n) for c in caches for n in names if getattr(c, n, None) is not None]


@pytest.mark.parametrize("kind", KINDS)
def test_decode_updates_caches_in_place(kind):
    """Every cache tensor keeps its address across decode steps (chunk ends, ring wrap): what a
    CUDA graph replay needs."""
    model = build(kind)
    caches = model.new_caches(torch.tensor([5, 17]), max_len=60)
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 17)), caches=caches)
        addresses = [t.data_ptr() for t in cache_tensors(caches)]
        for _ in range(60 - 17):
            model(torch.randint(0, 512, (2, 1)), caches=caches)
    assert [t.data_ptr() for t in cache_tensors(caches)] == addresses
    assert caches[0].pos.tolist() == [48, 60]


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_step_compiles_fullgraph_without_recompiling(kind, backend, monkeypatch):
    """fullgraph=True fails on any host read-back (.item(), .tolist(), data-dependent branch)
    and on the raw flash-attn extension call (hence the rat_titan::flash_decode op);
    fail_on_recompile proves the step keeps one graph across chunk ends and the ring wrap."""
    if backend == "flash":  # an extension function dynamo cannot trace, as flash-attn's is
        monkeypatch.setattr(decode_module, "decode_backend", lambda q: "flash")
        monkeypatch.setattr(flash_module, "flash_attn_with_kvcache",
                            torch._dynamo.disable(reference_flash_attn_with_kvcache))
    torch._dynamo.reset()
    model = build(kind)
    prompt = torch.randint(0, 512, (2, 14))
    lengths = torch.tensor([14, 9])
    eager_caches = model.new_caches(lengths, max_len=40)
    caches = model.new_caches(lengths, max_len=40)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        model(prompt, caches=eager_caches)
        model(prompt, caches=caches)
        token = torch.randint(0, 512, (2, 1))
        for step in range(40 - 14):
            want = model(token, caches=eager_caches)
            got = compiled(token, caches=caches)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            token = want[:, -1].argmax(-1, keepdim=True)
            if step == 1:  # the first steps compile; none may after
                torch.compiler.set_stance("fail_on_recompile")
    torch.compiler.set_stance("default")


def test_cache_capacity_errors():
    model = build("rat")
    with pytest.raises(ValueError, match="max_len=3 is shorter than the longest prompt"):
        model.new_caches(torch.tensor([2, 5]), max_len=3)
    with pytest.raises(ValueError, match="prompt lengths must be >= 1"):
        model.new_caches(torch.tensor([0, 5]), max_len=8)
    caches = model.new_caches(torch.tensor([4]), max_len=6)
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), caches=caches)
        model(torch.ones(1, 1, dtype=torch.long), caches=caches)
        model(torch.ones(1, 1, dtype=torch.long), caches=caches)
        with pytest.raises(ValueError, match="the cache is full: it holds max_len=6"):
            model(torch.ones(1, 1, dtype=torch.long), caches=caches)
        with pytest.raises(ValueError, match="already filled"):
            caches[0].fill(torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 4, 16))


def stand_in_capture(run, restore, device):
    """The capture protocol without a GPU: warm-up steps and the capture run ``run`` (here
    eagerly) and must leave the caches as they were; the replay is ``run``."""
    for _ in range(step_module.WARMUP_STEPS + 1):
        run()
        restore()
    return run


@pytest.mark.parametrize("kind", KINDS)
def test_graph_protocol_leaves_caches_untouched(kind, monkeypatch):
    model = build(kind)
    prompts = [[1, 2, 3], list(range(5, 20)), [9] * 33]
    eager = generate(model, prompts, max_new_tokens=24, return_logits=True)
    monkeypatch.setattr(step_module, "capture_cuda_graph", stand_in_capture)
    graphed = generate(model, prompts, max_new_tokens=24, return_logits=True, cuda_graph=True)
    assert graphed.tokens == eager.tokens
    for a, b in zip(graphed.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graph_needs_cuda():
    model = build("rat")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        generate(model, [[1, 2]], max_new_tokens=3, cuda_graph=True)
    with pytest.raises(ValueError, match="DecodeStep needs caches filled"):
        DecodeStep(model, model.new_caches(torch.tensor([2]), max_len=4))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_generation_equals_eager(kind, dtype):
    model = build(kind, device="cuda", dtype=dtype)
    prompts = [[1, 2, 3], list(range(5, 20)), [9] * 33]
    eager = generate(model, prompts, max_new_tokens=24, return_logits=True)
    graphed = generate(model, prompts, max_new_tokens=24, return_logits=True, cuda_graph=True)
    assert graphed.tokens == eager.tokens
    for a, b in zip(graphed.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_decode_step_never_syncs(kind):
    model = build(kind, device="cuda", dtype=torch.bfloat16)
    caches = model.new_caches(torch.tensor([3, 20], device="cuda"), max_len=40)
    with torch.inference_mode():
        model(torch.randint(0, 512, (2, 20), device="cuda"), caches=caches)
        step = DecodeStep(model, caches)
        token = torch.zeros(2, dtype=torch.long, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(19):
                token = step(token).argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")

"""Model shapes, init, config errors, and cached decoding against the full forward."""

import math

import pytest
import torch

from oracle import model_loop
from rat_plugin.model import RAT, RATModel, RATModelArgs, make_args


def test_1p3b_parameter_counts():
    counts = {}
    for kind in ("rat", "rat_swa"):
        with torch.device("meta"):
            model = RATModel(make_args(kind, "1.3B"))
        counts[kind] = sum(p.numel() for p in model.parameters())  # tied weight counted once
        print(f"{kind} 1.3B parameters: {counts[kind]:,}")
    assert counts == {"rat": 1_298_810_880, "rat_swa": 1_286_203_392}


def test_layer_patterns():
    assert [make_args("rat", "1.3B").layer_mixer(i) for i in range(4)] == ["rat"] * 4
    args = make_args("rat_swa", "1.3B")
    assert [args.layer_mixer(i) for i in range(4)] == ["rat", "swa"] * 2
    assert args.swa_window == 1024
    assert [make_args("rat_attn", "1.3B").layer_mixer(i) for i in range(2)] == ["attention"] * 2


def build(kind="rat", **overrides):
    with torch.device("meta"):
        model = RATModel(make_args(kind, "debugmodel", **overrides))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


@pytest.mark.parametrize("kind", ["rat", "rat_swa", "rat_attn"])
def test_fp64_model_matches_the_loop_oracle(kind):
    """In fp64 every step of the model is fp64: the logits equal the loop oracle's to 1e-12
    (one fp32 step, such as a forget gate computed in fp32, leaves ~1e-10 here and caps
    agreement with other fp64 implementations at ~1e-7 on real models)."""
    torch.manual_seed(0)
    swa = dict(swa_window=5) if kind == "rat_swa" else {}
    model = build(kind, chunk_size=4, n_layers=2, **swa).double()
    tokens = torch.randint(0, model.args.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model_loop(model, tokens), atol=1e-12, rtol=0)


def test_init_after_meta_build():
    torch.manual_seed(0)
    model = build("rat_swa")
    assert model.output.weight is model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("wg.bias"):
            assert 0.0 <= p.min() and p.max() <= math.log(15), name
            assert p.max() - p.min() > 1.0, "b_g should spread over [0, ln(L-1)]"
        else:
            assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.004, name


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_forget_bias_is_defined_for_tiny_chunks(chunk_size):
    mixer = RAT(make_args("rat", "debugmodel", chunk_size=chunk_size))
    mixer.init_weights()
    assert torch.equal(mixer.wg.bias, torch.zeros_like(mixer.wg.bias))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_groups=3), "n_groups=3 does not divide n_heads=4"),
        (dict(dim=130), "dim=130 is not divisible by n_heads=4"),
        (dict(chunk_size=0), "chunk_size=0 must be >= 1"),
        (dict(swa_window=0), "swa_window=0 must be >= 1"),
        (dict(mixer="mamba"), "mixer='mamba' is unknown"),
    ],
)
def test_bad_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args("rat_swa", "debugmodel", **overrides)


def test_a_window_cannot_change_the_model_kind():
    with pytest.raises(ValueError, match="swa_window=8 would change model kind 'rat'"):
        make_args("rat", "debugmodel", swa_window=8)
    with pytest.raises(ValueError, match="swa_window=None would change model kind 'rat_attn_swa'"):
        make_args("rat_attn_swa", "debugmodel", swa_window=None)
    assert make_args("rat_swa", "debugmodel", swa_window=8).layer_mixer(1) == "swa"


def test_unknown_kind_and_flavor():
    with pytest.raises(ValueError, match="unknown flavor '2B'.*debugmodel"):
        make_args("rat", "2B")
    with pytest.raises(ValueError, match="unknown model kind 'rwkv'"):
        make_args("rwkv", "1.3B")


def test_seq_len_must_be_whole_chunks():
    args = make_args("rat", "debugmodel")
    args.check_seq_len(256)
    with pytest.raises(ValueError, match="seq_len=250 is not a multiple of chunk_size=16: use seq_len=240 or 256"):
        args.check_seq_len(250)
    make_args("rat_attn", "debugmodel").check_seq_len(250)  # attention has no chunks


def test_tensor_parallel_head_mismatch_is_a_clear_error():
    args = make_args("rat", "debugmodel")
    mixer = RAT(args)
    mixer.wv = torch.nn.Linear(args.dim, 3 * args.head_dim, bias=False)  # 3 local heads, G = 2
    with pytest.raises(ValueError, match="3 local heads is not a multiple of n_groups=2"):
        mixer(torch.randn(1, 16, args.dim))


def test_out_of_vocab_tokens_are_rejected_when_generating():
    model = build()
    tokens = torch.tensor([[1, 2, 5000]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2048\), got \[1, 5000\]"):
        model(tokens, caches=model.new_caches(torch.tensor([3]), max_len=8))


CHUNK = 16
PROMPT_LENGTHS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


@pytest.mark.parametrize("kind", ["rat", "rat_swa", "rat_attn"])
@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS)
def test_prefill_then_decode_matches_full_forward(kind, prompt_len):
    """Decoding runs past the training length (max_seq_len=32) and, for SWA, wraps the ring."""
    torch.manual_seed(0)
    window = {"swa_window": 8} if kind == "rat_swa" else {}
    model = build(kind, dim=64, n_layers=2, ffn_hidden_dim=128, max_seq_len=32, **window).eval()
    total = 3 * CHUNK + 5 + 24
    tokens = torch.randint(0, model.args.vocab_size, (2, total))
    lengths = torch.tensor([prompt_len, max(prompt_len - 3, 1)])  # a batch of mixed lengths
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(lengths, max_len=total)
        prefill = model(tokens[:, :prompt_len], caches=caches)
        for b, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(prefill[b, :length], full[b, :length], rtol=0, atol=1e-5)
        rows = torch.arange(2)
        for _ in range(total - prompt_len):
            pos = caches[0].pos.clone()
            logits = model(tokens[rows, pos][:, None], caches=caches)
            torch.testing.assert_close(logits[:, 0], full[rows, pos], rtol=0, atol=1e-5)


def test_decode_step_takes_one_token():
    model = build()
    caches = model.new_caches(torch.tensor([4]), max_len=8)
    model(torch.ones(1, 4, dtype=torch.long), caches=caches)
    with pytest.raises(ValueError, match="one token per sequence"):
        model(torch.ones(1, 2, dtype=torch.long), caches=caches)


def test_cache_is_about_chunk_size_times_smaller_than_attention():
    torch.manual_seed(0)
    sizes = {}
    for kind in ("rat", "rat_attn"):
        model = build(kind).eval()
        caches = model.new_caches(torch.tensor([200]), max_len=200)
        with torch.no_grad():
            model(torch.randint(0, 100, (1, 200)), caches=caches)
        sizes[kind] = sum(c.nbytes_per_sequence() for c in caches)
    args = make_args("rat", "debugmodel")
    per_layer_rat = 2 * args.dim * -(-200 // CHUNK) * 4 + 2 * args.dim * 4
    assert sizes["rat"] == args.n_layers * per_layer_rat
    assert sizes["rat_attn"] == args.n_layers * 2 * args.dim * 200 * 4
    assert sizes["rat_attn"] / sizes["rat"] > CHUNK * 0.75


def test_args_are_a_typed_dataclass_with_defaults():
    args = RATModelArgs()
    assert (args.dim, args.n_heads, args.head_dim, args.chunk_size) == (2048, 16, 128, 16)


def test_logits_at_returns_the_requested_positions():
    torch.manual_seed(0)
    model = build().eval()
    tokens = torch.randint(0, 100, (3, 40))
    at = torch.tensor([0, 17, 39])
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, logits_at=at)
    torch.testing.assert_close(picked, full[torch.arange(3), at], rtol=0, atol=1e-6)

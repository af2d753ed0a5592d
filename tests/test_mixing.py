"""rat_mixing against the per-token loop oracle (docs/design.md section 1), and its defining
properties."""

import pytest
import torch

from oracle import assert_matches_loop_oracle, rat_mixing_loop, rotate, window_attention_loop
from rat_plugin.ops import chunk_scan, rat_mixing
from rat_plugin.ops.window_attention import window_attention


def random_inputs(batch, seq_len, heads, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    gate = torch.rand(batch, seq_len, heads, head_dim, generator=gen, dtype=dtype) * 0.98 + 0.01
    return q, k, v, gate


SHAPES = [  # (B, T, H, d, L)
    pytest.param(2, 48, 3, 8, 16, id="whole-chunks"),
    pytest.param(2, 37, 3, 8, 4, id="partial-last-chunk"),
    pytest.param(1, 5, 2, 4, 16, id="shorter-than-one-chunk"),
    pytest.param(2, 9, 2, 4, 1, id="L=1"),
    pytest.param(1, 24, 2, 4, 24, id="L=T"),
    pytest.param(1, 70, 1, 16, 16, id="many-chunks"),
]


@pytest.mark.parametrize("batch,seq_len,heads,head_dim,chunk_size", SHAPES)
def test_matches_loop_oracle(batch, seq_len, heads, head_dim, chunk_size):
    q, k, v, gate = random_inputs(batch, seq_len, heads, head_dim)
    expected = rat_mixing_loop(q, k, v, gate, chunk_size)
    torch.testing.assert_close(rat_mixing(q, k, v, gate, chunk_size), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "batch,seq_len,heads,head_dim,chunk_size",
    [(1, 21, 2, 4, 4), (2, 8, 1, 4, 1), (1, 12, 2, 4, 12), (1, 35, 1, 8, 16)],
    ids=["partial", "L=1", "L=T", "L=16"],
)
def test_gradients_match_oracle(batch, seq_len, heads, head_dim, chunk_size):
    inputs = [t.requires_grad_() for t in random_inputs(batch, seq_len, heads, head_dim, seed=1)]
    assert_matches_loop_oracle(rat_mixing, inputs, chunk_size)


def test_chunk_size_one_is_causal_attention_over_gated_inputs():
    q, k, v, gate = random_inputs(2, 19, 2, 8)
    expected = window_attention_loop(q, (1 - gate) * k, (1 - gate) * v, window=None)
    torch.testing.assert_close(rat_mixing(q, k, v, gate, 1), expected, rtol=0, atol=1e-10)


def gated_rnn_loop(v, gate):
    state, outs = torch.zeros_like(v[:, 0]), []
    for t in range(v.shape[1]):
        state = gate[:, t] * state + (1 - gate[:, t]) * v[:, t]
        outs.append(state)
    return torch.stack(outs, dim=1)


def test_chunk_size_seq_len_is_a_gated_rnn_independent_of_q_and_k():
    q, k, v, gate = random_inputs(2, 20, 2, 8)
    out = rat_mixing(q, k, v, gate, 20)
    torch.testing.assert_close(out, gated_rnn_loop(v, gate), rtol=0, atol=1e-12)
    assert torch.equal(out, rat_mixing(torch.randn_like(q) * 50, torch.randn_like(k), v, gate, 20))


def test_first_chunk_tokens_get_exactly_their_running_value():
    q, k, v, gate = random_inputs(2, 40, 2, 8)
    out = rat_mixing(q, k, v, gate, 16)
    _, v_state = chunk_scan(k, v, gate, 16)
    assert torch.equal(out[:, :16], v_state[:, :16])
    torch.testing.assert_close(out[:, :16], gated_rnn_loop(v[:, :16], gate[:, :16]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", [0, 15, 16, 17, 40, 63])
def test_perturbing_a_token_leaves_earlier_outputs_bit_identical(dtype, s):
    q, k, v, gate = random_inputs(2, 64, 2, 8, dtype=dtype)
    out = rat_mixing(q, k, v, gate, 16)
    perturbed = [t.clone() for t in (q, k, v, gate)]
    for t in perturbed[:3]:
        t[:, s] += 3.0
    perturbed[3][:, s] = 0.5
    out2 = rat_mixing(*perturbed, 16)
    assert torch.equal(out[:, :s], out2[:, :s])
    assert not torch.equal(out[:, s:], out2[:, s:])


def test_large_logits_and_low_precision_give_no_nan():
    q, k, v, gate = random_inputs(2, 50, 2, 8, dtype=torch.float32)
    out = rat_mixing(q * 1e4, k * 1e4, v, gate, 16)
    assert torch.isfinite(out).all()
    out = rat_mixing(*(t.bfloat16() for t in (q, k, v, gate)), 16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_chunk_size_must_be_positive():
    q, k, v, gate = random_inputs(1, 8, 1, 4)
    with pytest.raises(ValueError, match="chunk_size=0"):
        rat_mixing(q, k, v, gate, 0)


@pytest.mark.parametrize("window", [1, 3, 7, 29, None])
@pytest.mark.parametrize("seq_len", [1, 13, 30])
def test_window_attention_matches_loop_oracle(window, seq_len):
    q, k, v, _ = random_inputs(2, seq_len, 2, 8)
    # window_attention takes rotated q/k; the oracle rotates by token position itself.
    q_rot = torch.stack([rotate(q[:, t], t, 10000.0) for t in range(seq_len)], dim=1)
    k_rot = torch.stack([rotate(k[:, t], t, 10000.0) for t in range(seq_len)], dim=1)
    out = window_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2), window)
    expected = window_attention_loop(q, k, v, window)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=0, atol=1e-10)


def test_fullgraph_compile_matches_eager():
    """The portable path traces without graph breaks (per-block compile uses fullgraph=True)."""
    inputs = [t.requires_grad_() for t in random_inputs(2, 70, 2, 8)]
    compiled = torch.compile(rat_mixing, fullgraph=True, backend="aot_eager")
    assert_matches_loop_oracle(compiled, inputs, 16)

"""The portable kernels' fast paths (query blocks, hand-written backward) against the oracles."""

import importlib

import pytest
import torch

from rat_plugin.ops import rat_mixing
from oracle import assert_matches_loop_oracle

chunk_attention_module = importlib.import_module("rat_plugin.ops.chunk_attention")


@pytest.fixture
def small_blocks(monkeypatch):
    """16-query blocks, so a short sequence spans many blocks with masked and skipped parts."""
    monkeypatch.setattr(chunk_attention_module, "_BLOCK_QUERIES", 16)


@pytest.mark.parametrize("seq_len,chunk_size", [(150, 4), (136, 16), (61, 8)])
def test_blocked_mixing_matches_loop_oracle(small_blocks, seq_len, chunk_size):
    torch.manual_seed(0)
    shape = (2, seq_len, 2, 4)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    gate = torch.rand(shape, dtype=torch.float64).requires_grad_()
    assert_matches_loop_oracle(rat_mixing, [q, k, v, gate], chunk_size)


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
@pytest.mark.parametrize("summary_kind", ["unsorted", "sorted"])
def test_blocked_chunk_attention_matches_dense(small_blocks, summary_kind, documents):
    """Unsorted summaries (gathered CP pieces), the sorted prefix case, and per-sequence document
    bounds give the dense formula's values and gradients."""
    torch.manual_seed(0)
    batch, heads, seq_len, num_summaries, head_dim = 2, 1, 40, 5, 2
    q, k_state, v_state = (
        torch.randn(batch, heads, seq_len, head_dim, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    summary_k, summary_v = (
        torch.randn(batch, heads, num_summaries, head_dim, dtype=torch.float64,
                    requires_grad=True)
        for _ in range(2)
    )
    summary_chunk = {
        "unsorted": torch.randperm(num_summaries),
        "sorted": torch.arange(num_summaries),
    }[summary_kind]
    query_chunk = torch.randint(0, num_summaries + 1, (seq_len,))
    # A document starting at a random chunk <= the query's, per sequence.
    first = (torch.rand(batch, seq_len) * (query_chunk + 1)).long() if documents else None

    def blocked(*tensors):
        q, k_state, v_state, summary_k, summary_v = tensors
        return chunk_attention_module.chunk_attention(
            q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, 0.5, first
        )

    inputs = (q, k_state, v_state, summary_k, summary_v)
    dense = chunk_attention_module._dense_chunk_attention(
        q, k_state, v_state, query_chunk, summary_k, summary_v, summary_chunk, 0.5, first
    )
    torch.testing.assert_close(blocked(*inputs), dense, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(blocked, inputs)

"""Every parallel plan computes what one process computes: losses and gradients, RAT and RAT-SWA,
also with packed documents (document-aware masks) under CP and TP.

Two launches (2 ranks, 4 ranks) run all cases; each test compares one case with the
single-process reference (harness.reference): per-step global loss within rel. 1e-5, and the
full gradients of the first and last step within 1e-5 of the reference (relative Frobenius norm
per parameter; first step also element-wise against the tensor's largest entry).
"""

import pytest
import torch
from harness import CASES, KINDS, launch, reference

pytestmark = pytest.mark.slow

TWO_RANK = ["fsdp2", "tp2", "cp2-contiguous", "cp2-headtail", "cp2-headtail-no-exchange",
            "cp2-headtail-documents", "tp2-documents"]
FOUR_RANK = ["fsdp2xtp2", "fsdp2xcp2", "tp2xcp2", "hsdp2x2"]
RUNS = [(n, kind) for n in TWO_RANK + FOUR_RANK if not CASES[n].no_exchange for kind in KINDS]


@pytest.fixture(scope="module")
def references():
    torch.manual_seed(0)
    return {(kind, documents): reference(kind, documents)
            for kind in KINDS for documents in (False, True)}


@pytest.fixture(scope="module")
def two_ranks():
    return launch(2, TWO_RANK + ["errors"])


@pytest.fixture(scope="module")
def four_ranks():
    return launch(4, FOUR_RANK)


def _results(request, name: str) -> dict:
    return request.getfixturevalue("two_ranks" if CASES[name].world_size == 2 else "four_ranks")


def assert_grads_match(grads: dict, ref: dict, elementwise: bool) -> None:
    assert grads.keys() == ref.keys()
    for name, expected in ref.items():
        err = (grads[name] - expected).norm() / expected.norm()
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
        if elementwise:
            worst = (grads[name] - expected).abs().max() / expected.abs().max()
            assert worst <= 1e-5, f"{name}: largest element error {worst:.2e} of max |grad|"


@pytest.mark.parametrize("name,kind", RUNS, ids=[f"{n}-{k}" for n, k in RUNS])
def test_matches_single_process(name, kind, request, references):
    got = _results(request, name)[f"{name}-{kind}"]
    ref = references[kind, CASES[name].documents]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert ref["losses"][-1] < ref["losses"][0] - 0.1  # the steps really train
    first, last = got["grads"]
    assert_grads_match(first, ref["grads"][0], elementwise=True)
    assert_grads_match(last, ref["grads"][1], elementwise=False)


@pytest.mark.parametrize("kind", KINDS)
def test_cp_without_exchange_differs(kind, two_ranks, references):
    """Negative control: with the summary / halo exchange removed, CP ranks compute something
    else, so the CP equalities above are not vacuous."""
    got, ref = two_ranks[f"cp2-headtail-no-exchange-{kind}"], references[kind, False]
    assert got["losses"] != pytest.approx(ref["losses"], rel=1e-4)  # 10x the tolerance
    errors = [(got["grads"][0][n] - g).norm() / g.norm() for n, g in ref["grads"][0].items()]
    assert max(errors) > 0.5


def test_tp_grouped_qk_gradients_are_summed_over_ranks(two_ranks, references):
    """wq/wk are replicated under TP and each rank's heads give only part of their gradient:
    without the Partial-over-TP sum, a rank would hold its own heads' share only."""
    got, ref = two_ranks["tp2-rat"]["grads"][0], references["rat", False]["grads"][0]
    names = [n for n in ref if n.endswith(("mixer.wq.weight", "mixer.wk.weight"))]
    assert len(names) == 4
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-5 * ref[n].abs().max().item())


def test_bad_tp_degree_is_refused_before_any_collective(two_ranks):
    msg = two_ranks["errors"]["tp-bad-degree"]
    for part in ("tensor_parallel_degree=2", "n_heads=4", "n_groups=4"):
        assert part in msg


def test_misaligned_cp_pieces_are_refused(two_ranks):
    msg = two_ranks["errors"]["cp-misaligned"]
    for part in ("seq_len=96", "cp=2", "chunk_size=16", "64"):
        assert part in msg


@pytest.mark.parametrize("kind", KINDS)
def test_documents_change_the_computation(kind, references):
    """The document cases are not the plain ones under another name: masks are active."""
    plain, documents = references[kind, False], references[kind, True]
    assert documents["losses"] != pytest.approx(plain["losses"], rel=1e-4)

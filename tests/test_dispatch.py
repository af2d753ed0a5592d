"""Backend selection for rat_mixing: RAT_KERNELS / RAT_ATTENTION and the device."""

import pytest
import torch

from rat_plugin.ops import chunk_attention, chunk_scan, rat_mixing
from rat_plugin.ops.dispatch import MixingKernels, select_kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("RAT_KERNELS", "RAT_ATTENTION", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "kernels,attention,device,expected",
    [
        (None, None, CPU, ("torch", "torch")),
        (None, None, CUDA, ("triton", "flex")),
        ("auto", "auto", CUDA, ("triton", "flex")),
        ("torch", None, CUDA, ("torch", "torch")),
        ("torch", "flex", CUDA, ("torch", "flex")),
        ("triton", None, CUDA, ("triton", "flex")),
        ("triton", "torch", CUDA, ("triton", "torch")),
        (None, "flex", CPU, ("torch", "flex")),
        (" Torch ", "", CPU, ("torch", "torch")),
    ],
)
def test_selection(monkeypatch, kernels, attention, device, expected):
    if kernels is not None:
        monkeypatch.setenv("RAT_KERNELS", kernels)
    if attention is not None:
        monkeypatch.setenv("RAT_ATTENTION", attention)
    assert select_kernels(device) == MixingKernels(*expected)


def test_forcing_triton_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RAT_KERNELS", "triton")
    with pytest.raises(ValueError, match="triton needs CUDA tensors .*TRITON_INTERPRET"):
        select_kernels(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_kernels(CPU) == MixingKernels("triton", "torch")


@pytest.mark.parametrize("name", ["RAT_KERNELS", "RAT_ATTENTION"])
def test_unknown_value_is_rejected(monkeypatch, name):
    monkeypatch.setenv(name, "cuda")
    with pytest.raises(ValueError, match=f"{name}='cuda' is not one of auto"):
        select_kernels(CPU)


def test_bad_value_surfaces_from_rat_mixing(monkeypatch):
    monkeypatch.setenv("RAT_KERNELS", "fast")
    x = torch.randn(1, 4, 1, 4)
    with pytest.raises(ValueError, match="RAT_KERNELS='fast'"):
        rat_mixing(x, x, x, torch.sigmoid(x), 2)


def test_portable_kernels_are_the_reference_functions():
    kernels = select_kernels(CPU)
    assert kernels.chunk_scan is chunk_scan
    assert kernels.chunk_attention is chunk_attention


def test_fast_kernels_resolve():
    from rat_plugin.ops.flex_chunk_attention import flex_chunk_attention
    from rat_plugin.ops.triton_chunk_scan import triton_chunk_scan

    kernels = MixingKernels("triton", "flex")
    assert kernels.chunk_scan is triton_chunk_scan
    assert kernels.chunk_attention is flex_chunk_attention


def test_selection_traces_fullgraph(monkeypatch):
    """The env reads and the choice trace under torch.compile(fullgraph=True) without a break."""

    def pick(x):
        kernels = select_kernels(x.device)
        return x + 1 if kernels.scan == "torch" and kernels.attention == "flex" else x - 1

    monkeypatch.setenv("RAT_ATTENTION", "flex")
    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))

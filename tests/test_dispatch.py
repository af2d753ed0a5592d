"""Kernel selection: the model's scan_kernel / attention_kernel, RAT_KERNELS / RAT_ATTENTION
overriding them, and the device resolving "auto"."""

import pytest
import torch

from rat_plugin.model import RATModel, make_args
from rat_plugin.ops import chunk_attention, chunk_scan, rat_mixing
from rat_plugin.ops.dispatch import MixingKernels, select_kernels
from rat_plugin.ops.window_attention import window_attention

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
        ("triton", None, CPU, ("triton", "torch")),  # the custom op's CPU body
        ("triton_autotune", None, CUDA, ("triton_autotune", "flex")),
        (None, "flex_bf16", CUDA, ("triton", "flex_bf16")),
        (None, "flex", CPU, ("torch", "flex")),
        (" Torch ", "", CPU, ("torch", "torch")),
    ],
)
def test_selection(monkeypatch, kernels, attention, device, expected):
    """Configured values, and the same values from the environment over a different setting."""
    configured = dict(scan=kernels or "auto", attention=attention or "auto")
    assert select_kernels(device, **configured) == MixingKernels(*expected)
    monkeypatch.setenv("RAT_KERNELS", configured["scan"])
    monkeypatch.setenv("RAT_ATTENTION", configured["attention"])
    assert select_kernels(device, scan="torch", attention="torch") == MixingKernels(*expected)


def test_heads_below_16_channels_do_not_get_flex_on_cuda():
    """inductor's flex_attention refuses head_dim < 16 (CPU's reference flex does not)."""
    assert select_kernels(CUDA, head_dim=8) == MixingKernels("triton", "torch")
    assert select_kernels(CUDA, head_dim=16) == MixingKernels("triton", "flex")
    assert select_kernels(CPU, attention="flex", head_dim=8) == MixingKernels("torch", "flex")
    with pytest.raises(ValueError, match=r"attention_kernel='flex_bf16' needs head_dim >= 16 on "
                       r"CUDA \(inductor's flex_attention\), but heads have 8 channels"):
        select_kernels(CUDA, attention="flex_bf16", head_dim=8)


@pytest.mark.parametrize(
    "name,setting", [("RAT_KERNELS", "scan"), ("RAT_ATTENTION", "attention")]
)
def test_unknown_value_is_rejected(monkeypatch, name, setting):
    with pytest.raises(ValueError, match=f"{setting}_kernel='cuda' is not one of auto"):
        select_kernels(CPU, **{setting: "cuda"})
    monkeypatch.setenv(name, "cuda")
    with pytest.raises(ValueError, match=f"{name}='cuda' is not one of auto"):
        select_kernels(CPU)


def test_model_args_check_the_choice():
    with pytest.raises(ValueError, match="scan_kernel='fast' is not one of auto, torch, triton"):
        make_args("rat", "debugmodel", scan_kernel="fast")
    args = make_args("rat_swa", "debugmodel", scan_kernel="Triton", attention_kernel="flex")
    assert (args.scan_kernel, args.attention_kernel) == ("triton", "flex")
    model = RATModel(args)
    assert {block.mixer.kernel_choice for block in model.layers.values()} == {("triton", "flex")}


def test_bad_value_surfaces_from_rat_mixing(monkeypatch):
    monkeypatch.setenv("RAT_KERNELS", "fast")
    x = torch.randn(1, 4, 1, 4)
    with pytest.raises(ValueError, match="RAT_KERNELS='fast'"):
        rat_mixing(x, x, x, torch.sigmoid(x), 2)


def test_portable_kernels_are_the_reference_functions():
    kernels = select_kernels(CPU)
    assert kernels.chunk_scan is chunk_scan
    assert kernels.chunk_attention is chunk_attention
    assert kernels.window_attention is window_attention


def test_fast_kernels_resolve():
    from rat_plugin.ops.flex_chunk_attention import flex_chunk_attention
    from rat_plugin.ops.flex_window_attention import flex_window_attention
    from rat_plugin.ops.triton_chunk_scan import triton_chunk_scan

    kernels = MixingKernels("triton", "flex")
    assert kernels.chunk_scan is triton_chunk_scan
    assert kernels.chunk_attention is flex_chunk_attention
    assert kernels.window_attention is flex_window_attention
    tuned = MixingKernels("triton_autotune", "flex_bf16")
    assert tuned.chunk_scan.func is triton_chunk_scan and tuned.chunk_scan.keywords == {
        "autotune": True
    }
    assert tuned.chunk_attention.func is flex_chunk_attention
    assert tuned.chunk_attention.keywords == {"flex_dtype": torch.bfloat16}
    assert tuned.window_attention is flex_window_attention


def test_selection_traces_fullgraph(monkeypatch):
    """The env reads and the choice trace under torch.compile(fullgraph=True) without a break."""

    def pick(x):
        kernels = select_kernels(x.device)
        return x + 1 if kernels.scan == "torch" and kernels.attention == "flex" else x - 1

    monkeypatch.setenv("RAT_ATTENTION", "flex")
    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))

"""Plan validation in one process: clear errors for unsupported TP/CP setups, the float8 filter."""

import sys
import types

import pytest
import torch
import torch.distributed as dist
from harness import build_model, model_args
from torch import nn

from rat_plugin.infra import ConfigError
from rat_plugin.infra.context_parallel import HaloLayout, PieceAlignmentCheck, apply_cp
from rat_plugin.infra.float8 import float8_module_filter
from rat_plugin.infra.tensor_parallel import apply_tp, check_tp_degree


@pytest.mark.parametrize(
    "kind,overrides,tp,needle",
    [
        ("rat", dict(n_heads=4, n_groups=2), 4, "n_heads // n_groups = 2"),
        ("rat", dict(n_heads=8, dim=64, n_groups=2), 8, "n_heads // n_groups = 4"),
        ("rat_attn_swa", dict(n_heads=4), 3, "does not divide n_heads=4"),
        ("rat_attn", dict(ffn_hidden_dim=130), 4, "does not divide ffn_hidden_dim=130"),
    ],
    ids=["rat-groups", "rat-groups-8", "swa-heads", "ffn"],
)
def test_bad_tp_degree(kind, overrides, tp, needle):
    with pytest.raises(ConfigError, match=f"tensor_parallel_degree={tp}") as err:
        check_tp_degree(model_args(kind, **overrides), tp)
    assert needle in str(err.value)


@pytest.mark.parametrize("kind,tp", [("rat", 2), ("rat_swa", 2), ("rat_attn", 4)])
def test_good_tp_degree(kind, tp):
    check_tp_degree(model_args(kind), tp)


@pytest.mark.parametrize("kind", ["rat_attn", "rat_attn_swa"])
def test_cp_refuses_full_attention(kind):
    model = build_model(kind)
    with pytest.raises(ConfigError, match="full attention, which would need ring attention"):
        apply_cp(model, cp_mesh=None)  # refused before the mesh is used
    assert not model._forward_pre_hooks


def _headtail_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    pieces = torch.arange(seq_len).chunk(2 * cp)
    return torch.cat((pieces[rank], pieces[2 * cp - 1 - rank]))[None].expand(2, -1)


def test_piece_alignment_check():
    for rank in range(2):  # one check per rank, as each rank's model has its own
        check = PieceAlignmentCheck(chunk_size=16, cp=2)
        check(None, (None,), {"positions": _headtail_positions(128, 2, rank)})
    # 96 tokens: pieces of 24 are not whole chunks although each rank holds 48 = 3 * 16.
    with pytest.raises(ConfigError, match="seq_len=96 over cp=2 .* chunk_size=16"):
        check(None, (None,), {"positions": _headtail_positions(96, 2, 0)})
    with pytest.raises(ConfigError, match="needs the global `positions`"):
        check(None, (None,), {})


def test_cp_layout_is_derived_once_per_positions_shape(tmp_path, monkeypatch):
    """The CP pre-hooks sync with the host and run collectives only for a new positions shape;
    later forwards check on the device that the positions are unchanged."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        hooks = (PieceAlignmentCheck(chunk_size=16, cp=1), HaloLayout(mesh, window=8))
        collectives = []
        for name in ("all_reduce", "all_gather_into_tensor"):
            original = getattr(dist, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                collectives.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(dist, name, counted)

        def forward(positions):
            for hook in hooks:
                hook(None, (None, positions[None].expand(2, -1)), {})

        forward(torch.arange(64))
        first = len(collectives)
        assert first == 3  # the piece length, evenness, and the gathered tail positions
        for _ in range(3):
            forward(torch.arange(64))
        assert len(collectives) == first and hooks[1].pieces == [(0, 64)]
        forward(torch.arange(128))  # a new shape: derived again
        assert len(collectives) == 2 * first and hooks[1].pieces == [(0, 128)]
        with pytest.raises(RuntimeError, match="the positions changed"):
            forward(torch.arange(64, 128))
    finally:
        dist.destroy_process_group()


def test_float8_filter():
    model = build_model("rat_swa", dim=64, ffn_hidden_dim=128)
    kept = {fqn for fqn, m in model.named_modules() if float8_module_filter(m, fqn)}
    assert "layers.0.mixer.wv" in kept and "layers.0.feed_forward.w1" in kept
    assert not any(f.endswith(("mixer.wq", "mixer.wk")) for f in kept)
    assert "output" not in kept and "tok_embeddings" not in kept
    assert not float8_module_filter(nn.Linear(64, 24), "layers.0.feed_forward.w1")


def test_float8_tp_without_torchao_is_a_clear_error(monkeypatch):
    # As if torchao were not installed: a None entry makes its import fail, including the
    # submodules other tests already imported.
    for name in ["torchao", *(n for n in sys.modules if n.startswith("torchao."))]:
        monkeypatch.setitem(sys.modules, name, None)
    mesh = types.SimpleNamespace(size=lambda: 2)  # refused before the mesh is used
    with pytest.raises(ImportError, match="float8 tensor parallel needs torchao"):
        apply_tp(build_model("rat"), mesh, loss_parallel=True, enable_float8=True)

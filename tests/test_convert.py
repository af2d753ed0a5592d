"""Checkpoint converter: DCP -> standalone folder -> DCP, model detection, errors, atomicity.

DCP checkpoints here are written in one process with ``torch.distributed.checkpoint.save`` in
torchtitan's layout (flat model FQNs next to optimizer / lr_scheduler / train_state entries);
tests/test_roundtrip_trainer.py converts checkpoints of the real trainer.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from rat_plugin.atomic import atomic_dir
from rat_plugin.convert import (
    ConversionError,
    ModelSpec,
    dcp_to_standalone,
    spec_from_config,
    standalone_to_dcp,
)
from rat_plugin.model import RATModel, make_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
quiet = dict(log=lambda _: None)


def model_of(kind: str, seed: int = 0, **overrides) -> RATModel:
    torch.manual_seed(seed)
    model = RATModel(make_args(kind, "debugmodel", **overrides))
    model.init_weights()
    return model


def save_dcp(path: Path, model: RATModel, full: bool = False, extra: dict | None = None) -> Path:
    """A torchtitan-layout checkpoint: flat model keys (tied head under both names); a full
    checkpoint adds optimizer, lr_scheduler, dataloader and train_state entries."""
    state = dict(model.state_dict())
    if full:
        state["optimizer"] = {
            "state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in list(state.items())[:3]},
            "param_groups": [{"lr": 1e-3}],
        }
        state["lr_scheduler"] = {"last_epoch": 3}
        state["dataloader"] = {"dp_rank_0": b"position"}
        state["train_state"] = {"step": 3}
    state.update(extra or {})
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def weights_equal(folder: Path, model: RATModel, dtype=torch.float32) -> None:
    stored = load_file(str(folder / "model.safetensors"))
    want = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    assert set(stored) == set(want)
    for k, v in want.items():
        assert stored[k].dtype == dtype
        torch.testing.assert_close(stored[k], v.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
@pytest.mark.parametrize("full", [False, True])
def test_shapes_identify_the_model_and_weights_survive(tmp_path, kind, full, capsys):
    model = model_of(kind)
    step = save_dcp(tmp_path / "step-3", model, full=full)
    assert convert_main([str(step), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"kind={kind} flavor=debugmodel (from checkpoint shapes)" in out
    weights_equal(tmp_path / "out", model)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_kind"] == kind and config["dtype"] == "fp32"
    assert config["args"] == {**vars(model.args)}


def test_config_toml_with_cli_overrides_and_bf16_and_tokenizer(tmp_path, capsys):
    model = model_of("rat_swa")
    step = save_dcp(tmp_path / "step-1", model)
    toml = tmp_path / "train.toml"
    toml.write_text(
        f'[model]\nname = "rat"\nflavor = "1.3B"\nhf_assets_path = "{TOKENIZER}"\n'
        "[training]\nseq_len = 128\n"
    )
    argv = [str(step), str(tmp_path / "out"), "--config", str(toml), "--model.name", "rat_swa",
            "--flavor", "debugmodel", "--dtype", "bf16"]
    assert convert_main(argv) == 0
    out = capsys.readouterr().out
    assert f"kind=rat_swa flavor=debugmodel (from config {toml} + command line)" in out
    assert "tokenizer: copied tokenizer.json" in out
    weights_equal(tmp_path / "out", model, torch.bfloat16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bf16" and config["args"]["max_seq_len"] == 128
    assert config["args"]["swa_window"] == 64 and config["args"]["chunk_size"] == 16
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_ambiguous_shapes_ask_for_the_config(tmp_path, capsys):
    # rat_attn and rat_attn_swa have identical weights: the window leaves no trace.
    step = save_dcp(tmp_path / "step-1", model_of("rat_attn"))
    assert convert_main([str(step), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "rat_attn/debugmodel, rat_attn_swa/debugmodel" in err and "--config" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_lists_the_differences(tmp_path):
    step = save_dcp(tmp_path / "step-1", model_of("rat_swa"))
    spec = spec_from_config(None, "rat", "debugmodel")
    with pytest.raises(ConversionError) as info:
        dcp_to_standalone(step, tmp_path / "out", spec, **quiet)
    message = str(info.value)
    assert "missing keys: layers.1.mixer.wg.bias" in message
    assert "layers.1.mixer.wq.weight (128, 128) != (64, 128)" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_unknown_keys_are_listed(tmp_path):
    extra = {"layers.0.mixer.extra_proj.weight": torch.ones(2),
             "layers.9.ffn_norm.weight": torch.ones(2)}
    step = save_dcp(tmp_path / "a", model_of("rat"), extra=extra)
    spec = spec_from_config(None, "rat", "debugmodel")
    with pytest.raises(ConversionError, match="unknown keys: layers.0.mixer.extra_proj.weight, "
                                              "layers.9.ffn_norm.weight"):
        dcp_to_standalone(step, tmp_path / "out", spec, **quiet)
    step = save_dcp(tmp_path / "b", model_of("rat"), extra={"lm_head.weight": torch.ones(2)})
    with pytest.raises(ConversionError, match="neither RAT model weights.*: lm_head.weight"):
        dcp_to_standalone(step, tmp_path / "out", spec, **quiet)


@pytest.mark.parametrize("make,error", [
    (lambda p: p.mkdir(), r"cannot read training config .*train.toml \(Is a directory\): pass "
                          r"the TOML file"),
    (lambda p: p.symlink_to(p), r"cannot read training config .*\(Too many levels of symbolic "
                                r"links\)"),
    (lambda p: p.write_bytes(b"[model]\nname = '\xff'\n"), r"is not valid TOML"),
    (lambda p: p.write_text("model = 3\n"), r"model = 3 in .*train.toml: \[model\] must be a "
                                             r"table"),
    (lambda p: p.write_text("[model]\nname = ['rat']\nflavor = 'debugmodel'\n"),
     r"\[model\] name = \['rat'\] in .*train.toml: give a string"),
], ids=["folder", "symlink-loop", "not-utf8", "model-not-a-table", "name-not-a-string"])
def test_unreadable_training_configs_are_one_line(make, error, tmp_path):
    make(tmp_path / "train.toml")
    with pytest.raises(ConversionError) as info:
        spec_from_config(tmp_path / "train.toml")
    assert "\n" not in str(info.value) and re.search(error, str(info.value)), info.value


def test_missing_and_corrupt_checkpoints(tmp_path):
    spec = spec_from_config(None, "rat", "debugmodel")
    with pytest.raises(ConversionError, match="does not exist"):
        dcp_to_standalone(tmp_path / "nope", tmp_path / "out", spec, **quiet)
    (tmp_path / "ckpt" / "step-10").mkdir(parents=True)
    with pytest.raises(ConversionError, match="did you mean .*step-10"):
        dcp_to_standalone(tmp_path / "ckpt", tmp_path / "out", spec, **quiet)
    step = save_dcp(tmp_path / "bad-meta", model_of("rat"))
    (step / ".metadata").write_bytes(b"\x00garbage")
    with pytest.raises(ConversionError, match="corrupt"):
        dcp_to_standalone(step, tmp_path / "out", spec, **quiet)
    step = save_dcp(tmp_path / "bad-data", model_of("rat"))
    for data in step.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:1000])  # truncated shard
    with pytest.raises(ConversionError, match="corrupt or incomplete"):
        dcp_to_standalone(step, tmp_path / "out", spec, **quiet)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="model 'llama3' is not a RAT model kind"):
        spec_from_config(None, "llama3", "debugmodel")
    with pytest.raises(ConversionError, match="give both"):
        spec_from_config(None, "rat", None)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_failure_mid_write_leaves_no_output_and_no_temp(tmp_path, monkeypatch):
    model = model_of("rat")
    step = save_dcp(tmp_path / "step-1", model)
    spec = spec_from_config(None, "rat", "debugmodel")

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(ConversionError, match="cannot write .*out \\(disk full\\)"):
        dcp_to_standalone(step, tmp_path / "out", spec, **quiet)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    # With --force, a failed replacement keeps the old folder untouched.
    monkeypatch.undo()
    dcp_to_standalone(step, tmp_path / "out", spec, **quiet)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(ConversionError, match="disk full"):
        dcp_to_standalone(step, tmp_path / "out", spec, force=True, **quiet)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert leftovers(tmp_path) == []


def test_no_overwrite_without_force(tmp_path, capsys):
    first, second = model_of("rat", seed=0), model_of("rat", seed=1)
    save_dcp(tmp_path / "s1", first)
    save_dcp(tmp_path / "s2", second)
    out = tmp_path / "out"
    assert convert_main([str(tmp_path / "s1"), str(out)]) == 0
    assert convert_main([str(tmp_path / "s2"), str(out)]) == 1
    assert "already exists: pass --force" in capsys.readouterr().err
    weights_equal(out, first)
    assert convert_main([str(tmp_path / "s2"), str(out), "--force"]) == 0
    weights_equal(out, second)
    assert leftovers(tmp_path) == []


def test_atomic_dir_keeps_modes_usual(tmp_path):
    with atomic_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_standalone_back_to_dcp_seeds_a_model(tmp_path, capsys):
    model = model_of("rat_swa")
    save_dcp(tmp_path / "step-1", model)
    spec = spec_from_config(None, "rat_swa", "debugmodel")
    dcp_to_standalone(tmp_path / "step-1", tmp_path / "std", spec, dtype=torch.bfloat16, **quiet)
    assert convert_main([str(tmp_path / "std"), str(tmp_path / "seed"), "--to-dcp"]) == 0
    assert convert_main([str(tmp_path / "std"), str(tmp_path / "seed"), "--to-dcp"]) == 1
    # Loading it like torchtitan does (flat FQNs, tied head under both names) into a fresh model.
    fresh = model_of("rat_swa", seed=5)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "seed"), no_dist=True)
    fresh.load_state_dict(state)
    for k, v in model.state_dict().items():
        want = v.to(torch.bfloat16).float()
        torch.testing.assert_close(fresh.state_dict()[k], want, atol=0, rtol=0)
    # And it converts forward again to the same folder contents.
    dcp_to_standalone(tmp_path / "seed", tmp_path / "std2", spec, dtype=torch.bfloat16, **quiet)
    a = load_file(str(tmp_path / "std" / "model.safetensors"))
    b = load_file(str(tmp_path / "std2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConversionError, match="does not exist"):
        standalone_to_dcp(tmp_path / "missing", tmp_path / "x", **quiet)


def test_converter_and_loader_share_the_shape_check(tmp_path, small_model_dir):
    """A folder whose config.json no longer fits its weights: the loader and the reverse
    converter report the same problems (rat_plugin/folder.py describes the format once)."""
    from folder_edits import edit_config

    from rat_plugin.generate import ModelFolderError, load

    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    edit_config(ffn_hidden_dim=96)(folder)
    problem = "shape mismatches (weights != model): layers.0.feed_forward.w1.weight (128, 64) != "
    with pytest.raises(ModelFolderError) as loaded:
        load(folder)
    with pytest.raises(ConversionError) as converted:
        standalone_to_dcp(folder, tmp_path / "seed", **quiet)
    for err in (loaded, converted):
        assert problem + "(96, 64)" in str(err.value) and "\n" not in str(err.value)


def test_untied_head_is_refused(tmp_path):
    model = model_of("rat")
    state = dict(model.state_dict())
    state["output.weight"] = state["output.weight"] + 1
    dcp.save(state, checkpoint_id=str(tmp_path / "s"), no_dist=True)
    spec = ModelSpec("rat", "debugmodel", model.args, "test")
    with pytest.raises(ConversionError, match="tie"):
        dcp_to_standalone(tmp_path / "s", tmp_path / "out", spec, **quiet)

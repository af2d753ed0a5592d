"""Converter surface (tools/convert_checkpoint.py), one table row per bad input: the tool exits
with 1 and one line naming the bad value and the fix, the source checkpoint's bytes are
unchanged, and an export already at the output path is intact."""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from killed import hidden, killed
from rat_plugin.model import RATModel, make_args

CONVERTER = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"
sys.path.insert(0, str(CONVERTER.parent))
from convert_checkpoint import main as convert_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def full_checkpoint(path: Path, edit=None) -> Path:
    """A torchtitan-layout full checkpoint (model, optimizer, trainer states) of the debug RAT
    model; ``edit(state)`` may spoil a weight first."""
    torch.manual_seed(0)
    model = RATModel(make_args("rat", "debugmodel"))
    model.init_weights()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if edit is not None:
        edit(state)
    state["output.weight"] = state["tok_embeddings.weight"]
    state["optimizer"] = {"state": {"tok_embeddings.weight": {"exp_avg": torch.ones(3)}}}
    state["train_state"] = {"step": 7}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def spoil(name: str, index: tuple, value: float):
    def edit(state: dict) -> None:
        state[name][index] = value
    return edit


def spoil_export(export: Path, edit) -> None:
    state = safetensors.torch.load_file(str(export / "model.safetensors"))
    edit(state)
    safetensors.torch.save_file(state, str(export / "model.safetensors"))


RAT = ("--model-name", "rat", "--flavor", "debugmodel")
NAN_ROW = spoil("tok_embeddings.weight", (5,), float("nan"))
# id -> (edit spoiling the source's weights or None, arguments after the source folder, regex
# the one-line error must match). The source is {src} = {tmp}/run/checkpoint/step-7, a full
# training checkpoint, or with --to-dcp {export}, a folder the tool wrote from it; {tmp}/notes
# is a folder of the user's.
CASES = {
    "output-is-source": (None, ["{src}", "--force"], r"output .*step-7 is the source checkpoint"),
    "output-inside-source": (None, ["{src}/export", "--force"], r"is inside the source checkpoint"),
    "output-contains-source": (None, ["{src}/..", "--force"], r"contains the source checkpoint"),
    "output-is-source-link": (None, ["{tmp}/link-to-src", "--force"], r"is the source checkpoint"),
    "to-dcp-output-is-source": (None, ["{export}", "--to-dcp", "--force"], r"is the source"),
    "force-onto-user-folder": (None, ["{tmp}/notes", "--force"], r"notes exists and is not a "
                               r"folder this tool wrote, so even --force does not replace it"),
    "user-folder-without-force": (None, ["{tmp}/notes"], r"notes exists and is not a folder "
                                  r"this tool wrote, so even --force does not replace it"),
    "force-onto-training-checkpoint": (None, ["{src}", "--to-dcp", "--force"],
                                       r"step-7 exists and is not a folder this tool wrote"),
    "force-onto-model-only-training-save": (None, ["{tmp}/run/checkpoint/step-9", "--to-dcp",
                                                   "--force"],
                                            r"step-9 exists and is not a folder this tool wrote"),
    "force-onto-another-model-folder": (None, ["{tmp}/llama", "--force"],
                                        r"llama exists and is not a folder this tool wrote"),
    "existing-output-without-force": (None, ["{export}"], r"export already exists: pass --force"),
    # model_type "rat" and a model.safetensors, but not the record only --to-hf writes.
    "force-onto-hand-made-rat-export": (None, ["{tmp}/rat_hf", "--to-hf", "--force"],
                                        r"rat_hf exists and is not a folder this tool wrote"),
    # Checked before the tied head is compared, so a NaN is not reported as "differs".
    "nan-embedding-row": (NAN_ROW, ["{tmp}/out"], r"step-7: tok_embeddings.weight holds a "
                          r"non-finite weight nan at \[5, 0\].*convert an earlier checkpoint"),
    "inf-norm-weight": (spoil("norm.weight", (3,), float("inf")), ["{tmp}/out"],
                        r"norm.weight holds a non-finite weight inf at \[3\]"),
    "absurd-ffn-weight": (spoil("layers.1.feed_forward.w2.weight", (2, 7), 3.4e38), ["{tmp}/out"],
                          r"w2.weight holds an absurd weight 3.4e\+38 at \[2, 7\] \(weights must "
                          r"be finite and within \+-10000\)"),
    "to-dcp-nan-export": (NAN_ROW, ["{tmp}/out", "--to-dcp"],
                          r"model.safetensors: tok_embeddings.weight holds a non-finite weight"),
    "negative-seq-len": (None, ["{tmp}/out", *RAT, "--seq-len", "-5"],
                         r"seq_len=-5 must be a positive number of tokens, e.g. 256 \(--seq-len"),
    "chunk-misaligned-seq-len": (None, ["{tmp}/out", *RAT, "--seq-len", "100"],
                                 r"seq_len=100 is not a multiple of chunk_size=16: use seq_len=96 "
                                 r"or 112"),
    "output-under-a-file": (None, ["{tmp}/notes/todo.txt/out"],
                            r"cannot write .*todo.txt/out \(.*\): choose a writable output folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_conversion_is_refused_and_loses_nothing(case, tmp_path, capsys):
    edit, args, pattern = CASES[case]
    to_dcp = "--to-dcp" in args or "--to-hf" in args  # from a folder the tool wrote
    src = full_checkpoint(tmp_path / "run" / "checkpoint" / "step-7", None if to_dcp else edit)
    export = tmp_path / "export"
    assert convert_main([str(full_checkpoint(tmp_path / "good"))
                         if edit and not to_dcp else str(src), str(export)]) == 0
    if edit and to_dcp:
        spoil_export(export, edit)
    (tmp_path / "link-to-src").symlink_to(src)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    # torchtitan's model-only last save, and a model folder of another library.
    dcp.save({"tok_embeddings.weight": torch.ones(4, 2)}, no_dist=True,
             checkpoint_id=str(tmp_path / "run" / "checkpoint" / "step-9"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "llama" / "model.safetensors"))
    (tmp_path / "rat_hf").mkdir()
    (tmp_path / "rat_hf" / "config.json").write_text('{"model_type": "rat"}')
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "rat_hf" / "model.safetensors"))
    capsys.readouterr()
    before = tree_hashes(tmp_path)

    argv = [a.format(src=src, export=export, tmp=tmp_path) for a in args]
    assert convert_main([str(export if to_dcp else src), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert tree_hashes(tmp_path) == before


def disk_full_in_safetensors(*args, **kwargs):  # what save_file raised on a full tmpfs
    raise safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")


def disk_full_in_dcp(*args, **kwargs):  # what dcp.save raised on a full tmpfs
    raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), None)})


@pytest.mark.parametrize("to_dcp", [False, True], ids=["folder", "dcp-seed"])
def test_disk_full_is_one_line_and_keeps_the_old_output(to_dcp, tmp_path, capsys, monkeypatch):
    src = full_checkpoint(tmp_path / "step-7")
    argv = [str(src), str(tmp_path / "out")]
    if to_dcp:  # a folder export -> a DCP seed
        assert convert_main(argv) == 0
        argv = [str(tmp_path / "out"), str(tmp_path / "seed"), "--to-dcp"]
    assert convert_main(argv) == 0
    capsys.readouterr()
    before = tree_hashes(tmp_path)
    if to_dcp:
        monkeypatch.setattr(dcp, "save", disk_full_in_dcp)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full_in_safetensors)
    assert convert_main([*argv, "--force"]) == 1
    err = capsys.readouterr().err
    reason = "unexpected pos 704 vs 598" if to_dcp else "No space left on device"
    assert err.count("\n") == 1 and re.search(
        rf"^error: cannot write .*(seed|out) \(.*{reason}.*\): choose a writable output folder "
        "with enough free space$", err), err
    assert tree_hashes(tmp_path) == before  # the old output intact, no temporary left


def test_damaged_model_file_is_one_line_when_seeding(tmp_path, capsys):
    assert convert_main([str(full_checkpoint(tmp_path / "step-7")), str(tmp_path / "out")]) == 0
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert convert_main([str(tmp_path / "out"), str(tmp_path / "seed"), "--to-dcp"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(
        r"^error: cannot read .*out/model.safetensors \(.*\): convert the checkpoint again$", err)
    assert not (tmp_path / "seed").exists()


def test_a_displaced_export_is_restored_before_the_output_is_checked(tmp_path, capsys):
    """Where the kernel cannot exchange folders, a kill mid-replacement leaves the old export
    in a .NAME.old-* sibling and nothing at the path: the next run restores it, then finds
    it there (and, with --force, knows it for its own)."""
    src = full_checkpoint(tmp_path / "step-7")
    out = tmp_path / "export"
    assert convert_main([str(src), str(out)]) == 0
    exported = tree_hashes(out)
    killed("displaced", CONVERTER, src, out, "--force")
    assert not out.exists() and len(hidden(tmp_path)) == 2
    capsys.readouterr()
    assert convert_main([str(src), str(out)]) == 1
    captured = capsys.readouterr()
    assert re.search(r"restored .*export from .export.old-.*\nremoved .export.tmp-", captured.out)
    assert re.search(r"^error: .*export already exists: pass --force to replace it$",
                     captured.err.strip())
    assert tree_hashes(out) == exported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "step-7"]
    assert convert_main([str(src), str(out), "--force"]) == 0


@pytest.mark.slow
def test_leftovers_the_conversion_reads_are_kept(tmp_path, capsys):
    """Complete folders left by killed conversions, used as the source and as the tokenizer
    of the next conversion to the same path, are kept; a conversion that does not read them
    removes them."""
    src = full_checkpoint(tmp_path / "step-7")
    tokenizer = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
    out = tmp_path / "export"
    killed("swap", CONVERTER, src, out, *RAT, "--tokenizer", tokenizer)
    (left_export,) = (tmp_path / name for name in hidden(tmp_path))
    assert convert_main([str(src), str(out), "--tokenizer", str(left_export)]) == 0
    assert (out / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    seed = tmp_path / "seed"
    killed("swap", CONVERTER, out, seed, "--to-dcp")
    (left_seed,) = (tmp_path / name for name in hidden(tmp_path) if name.startswith(".seed"))
    assert convert_main([str(left_seed), str(seed), "--to-dcp"]) == 1  # a DCP seed, not a folder
    assert convert_main([str(left_seed), str(seed)]) == 0  # DCP -> folder at the same path
    assert (left_seed / ".metadata").is_file() and (left_export / "tokenizer.json").is_file()
    kept = capsys.readouterr().out
    assert re.search(r"kept .export.tmp-\w+-\w+, left by an interrupted write of export, because "
                     r"this run reads it: move it elsewhere to keep it", kept), kept
    assert convert_main([str(src), str(out), "--force"]) == 0
    assert convert_main([str(src), str(seed), "--force"]) == 0
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("dtype", ["float64", 32])
def test_to_hf_of_a_folder_with_a_bad_dtype_is_one_line(dtype, tmp_path, capsys):
    export = tmp_path / "export"
    assert convert_main([str(full_checkpoint(tmp_path / "step-7")), str(export)]) == 0
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    capsys.readouterr()
    assert convert_main([str(export), str(tmp_path / "hf"), "--to-hf"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: .*export/config.json is invalid \(dtype={dtype!r} is not one of "
                        r"\['bf16', 'fp16', 'fp32'\]\): convert the checkpoint again\n", err), err
    assert not (tmp_path / "hf").exists()


def test_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """The OS refusing the write (simulated: the tests may run as root, which ignores modes)."""
    src = full_checkpoint(tmp_path / "step-7")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "mkdir", refuse)
    before = tree_hashes(tmp_path)
    assert convert_main([str(src), str(tmp_path / "read-only" / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(
        r"^error: cannot write .*read-only/out \(Permission denied\): choose a writable", err)
    assert tree_hashes(tmp_path) == before

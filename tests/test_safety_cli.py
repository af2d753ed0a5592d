"""Command-line surface (python -m rat_plugin.generate, tools/cache_memory.py), one table row
per bad input: exit code 1 (2 for usage errors), nothing on stdout, and one ``error:`` line on
stderr naming the bad value and the fix; or the correct behaviour."""

import re
import runpy
import shutil
import sys

import pytest
import torch

from conftest import REPO, run_main
from folder_edits import edit_config, spoil_weight, write
from rat_plugin.generate.__main__ import main as generate_main

sys.path.insert(0, str(REPO / "tools"))
import perplexity_by_position as ppl_tool  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = ["--prompt-ids", "1 2 3"]
TEXT = ["--prompt", "Once upon a time"]
# id -> (edit of a copy of the model folder or None, arguments after --model, exit code, regex).
CASES = {
    "unknown-device": (None, [*IDS, "--device", "tpu9"], 1, r"^--device tpu9: use cpu or cuda\[:N\]$"),
    "cuda-without-cuda": (None, [*IDS, "--device", "cuda"], 1,
                          r"^--device cuda: CUDA is not available on this machine: use cpu$"),
    "max-new-tokens-1e9-text": (None, [*IDS, "--max-new-tokens", "1e9"], 2,
                                r"argument --max-new-tokens: invalid int value: '1e9'"),
    "max-new-tokens-1e9": (None, [*IDS, "--max-new-tokens", "1000000000"], 1,
                           r"max_new_tokens=1000000000 needs .* GiB of decode cache for 1 "
                           r"sequence\(s\), but cpu has 1.0 GiB free: at most \d+ new tokens fit"),
    "max-new-tokens-1e30": (None, [*IDS, "--max-new-tokens", str(10**30)], 1,
                            r"max_new_tokens=10{30} needs [\d.e+]+ PiB of decode cache"),
    "max-new-tokens-zero": (None, [*IDS, "--max-new-tokens", "0"], 1,
                            r"^--max-new-tokens 0 must be >= 1$"),
    "temperature-nan": (None, [*IDS, "--temperature", "nan"], 1,
                        r"^--temperature nan must be finite and >= 0 \(0 is greedy\)$"),
    "temperature-inf": (None, [*IDS, "--temperature", "inf"], 1, r"^--temperature inf must be"),
    "top-k-zero": (None, [*IDS, "--top-k", "0"], 1, r"^--top-k 0 must be >= 1"),
    "top-p-above-one": (None, [*IDS, "--top-p", "1.5"], 1, r"^--top-p 1.5 must be in \(0, 1\]"),
    "seed-2-to-70": (None, [*IDS, "--seed", str(2**70)], 1,
                     r"^--seed 1180591620717411303424 is out of range: give a seed in \[0, 2\*\*64"),
    "dtype-unknown": (None, [*IDS, "--dtype", "int8"], 2,
                      r"argument --dtype: invalid choice: 'int8' \(choose from 'fp32', 'bf16', 'fp16'\)"),
    "unknown-flag": (None, [*IDS, "--nucleus", "0.9"], 2, r"unrecognized arguments: --nucleus 0.9"),
    "float-prompt-ids": (None, ["--prompt-ids", "1 2.5"], 1,
                         r"--prompt-ids '1 2.5': give integers such as '1 450 338'"),
    "id-outside-vocab": (None, ["--prompt-ids", "1 99999"], 1, r"outside the vocabulary"),
    "missing-prompts-file": (None, ["--prompts-file", "/nonexistent/p.txt"], 1,
                             r"prompts file /nonexistent/p.txt does not exist"),
    "binary-prompts-file": (None, ["--prompts-file", "{folder}/model.safetensors"], 1,
                            r"^prompts file .*/model.safetensors is not UTF-8 text \(byte "
                            r"0x[0-9a-f]{2} at offset \d+\): give a UTF-8 text file, one prompt "
                            r"per line$"),
    "nan-embedding-row": (spoil_weight("tok_embeddings.weight", (5,), float("nan")), TEXT, 1,
                          r"tok_embeddings.weight holds a non-finite weight nan at \[5, 0\]"),
    "inf-norm-weight": (spoil_weight("norm.weight", (0,), float("inf")), IDS, 1,
                        r"norm.weight holds a non-finite weight inf"),
    "absurd-ffn-weight": (spoil_weight("layers.0.feed_forward.w2.weight", (1, 1), 3.4e38), IDS, 1,
                          r"w2.weight holds an absurd weight 3.4e\+38"),
    "float-n-heads": (edit_config(n_heads=4.0), IDS, 1,
                      r"config.json is invalid \(n_heads=4.0 must be an integer\)"),
    "tokenizer-json-empty-object": (write("tokenizer.json", "{}"), TEXT, 1,
                                    r"tokenizer.json is not a valid tokenizer \(Model missing"),
    "bad-tokenizer-config": (write("tokenizer_config.json", "{bos"), TEXT, 1,
                             r"tokenizer_config.json is not valid JSON \(.*\): fix it or convert"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_generate_command_is_one_line(case, small_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on the reporter's machine
    monkeypatch.setattr("rat_plugin.generate.memory.free_bytes", lambda device: 1 << 30)
    edit, args, code, pattern = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    if edit is not None:
        edit(folder)
    args = [a.format(folder=folder) for a in args]
    rc, out, err = run_main(generate_main, ["--model", str(folder), *args], capsys)
    assert (rc, out) == (code, ""), (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern.replace("10{30}", str(10**30)), err.removeprefix("error: ")), err


def test_edited_config_is_one_warning_line_then_generates(small_model_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    edit_config(chunk_size=32)(folder)
    rc, out, err = run_main(generate_main, ["--model", str(folder), *IDS, "--max-new-tokens", "2"],
                            capsys)
    assert rc == 0 and len(out.splitlines()[0].split()) == 5
    assert err.count("\n") == 1 and err.startswith(
        "warning: ") and "chunk_size=32 (exported with 16)" in err


@pytest.mark.parametrize("positions", [["-5"], ["4096", "0"]])
def test_cache_memory_refuses_non_positive_positions(positions, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cache_memory.py", "--positions", *positions])
    rc, out, err = run_main(lambda _: runpy.run_path(str(REPO / "tools" / "cache_memory.py"),
                                                     run_name="__main__"), [], capsys)
    assert (rc, out) == (2, "")
    assert re.fullmatch(r"error: argument --positions: -?\d+ is not a position: give counts >= 1\n",
                        err), err


def test_perplexity_tool_refuses_a_text_that_is_not_utf8(small_model_dir, tmp_path, capsys):
    """A binary file was scored as text (undecodable bytes replaced): refused in one line
    naming it, before the model loads, and nothing is written."""
    binary = small_model_dir / "model.safetensors"
    argv = ["--model", str(small_model_dir), "--text", str(binary), "--out", str(tmp_path / "o")]
    rc, out, err = run_main(ppl_tool.main, argv, capsys)
    assert (rc, out) == (1, "") and err.count("\n") == 1, err
    assert re.fullmatch(rf"error: --text {re.escape(str(binary))} is not UTF-8 text \(byte "
                        r"0x[0-9a-f]{2} at offset \d+\): give a UTF-8 text file\n", err), err
    assert not (tmp_path / "o").exists()

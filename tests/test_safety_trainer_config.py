"""Trainer configuration surface, one table row per bad job: a ConfigError whose one line names
the setting and the fix, raised by what torchtitan's Trainer runs before any training (the
plugin's import-time job check, the train spec lookup, the tokenizer build, the flavor lookup,
update_from_config and the FLOP count). The slow tests launch the real entry points and check
that such an error reaches the user as one line per rank and a non-zero exit."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

import rat_plugin.train_spec as ts
from conftest import REPO, launch
from rat_plugin.data.tokenizer import read_tokenizer
from rat_plugin.infra import ConfigError
from rat_plugin.infra.job import check_launch
from rat_plugin.infra.settings import check_settings

DEBUG_TOML = REPO / "train_configs" / "rat_debug.toml"


def toml_without(tmp_path: Path, line: str) -> Path:
    """rat_debug.toml with one line removed."""
    text = DEBUG_TOML.read_text()
    assert line in text.splitlines()
    path = tmp_path / "edited.toml"
    path.write_text("\n".join(l for l in text.splitlines() if l != line) + "\n")
    return path


def tokenizer_folder(tmp_path: Path, tokenizer_json: str | None = None,
                     tokenizer_config: str | None = None) -> Path:
    """A copy of the debug tokenizer with its files replaced."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(REPO / "assets" / "tokenizer", folder)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(tokenizer_json)
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(tokenizer_config)
    return folder


def sparse_ids_tokenizer(tmp_path: Path) -> Path:
    """The debug tokenizer (724 entries) with one id moved to 4000, past the 2048 vocabulary."""
    data = json.loads((REPO / "assets" / "tokenizer" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    token = max(vocab, key=vocab.get)
    vocab[token] = 4000
    folder = tokenizer_folder(tmp_path, tokenizer_json=json.dumps(data))
    assert read_tokenizer(folder).get_vocab_size() == 724  # entries: fewer than 2048
    return folder


def trainer_setup(config: Path, *overrides: str) -> None:
    """What torchtitan's Trainer.__init__ runs with the plugin before any training."""
    job = ConfigManager().parse_args(["--job.config_file", str(config), *overrides])
    check_launch(job)  # what importing rat_plugin.train_spec checks in a trainer process
    spec = get_train_spec(job.model.name)
    spec.build_tokenizer_fn(job)
    args = ts.RATTitanArgs(**vars(spec.model_args[job.model.flavor]))  # a copy: it is updated
    args.update_from_config(job)
    with torch.device("meta"):
        model = spec.model_cls(args)
    args.get_nparams_and_flops(model, job.training.seq_len)


KINDS = r"\['rat', 'rat_attn', 'rat_attn_swa', 'rat_swa'\]"
# id -> (function of tmp_path giving (config, overrides), regex of the ConfigError).
CASES = {
    "no-model-name": (lambda tmp: (toml_without(tmp, 'name = "rat"'), []),
                      r"^\[model\] name='llama3' \(torchtitan's default: \[model\] name is not set\) "
                      rf"is not a RAT model: set it to one of {KINDS} \(--model.name\)"),
    "unknown-model-name": (lambda tmp: (DEBUG_TOML, ["--model.name", "ratt"]),
                           rf"^\[model\] name='ratt' is not a RAT model: set it to one of {KINDS}"),
    "unknown-flavor": (lambda tmp: (DEBUG_TOML, ["--model.flavor", "2B"]),
                       r"^\[model\] flavor='2B' is unknown for rat: choose one of"),
    "zero-seq-len": (lambda tmp: (DEBUG_TOML, ["--training.seq_len", "0"]),
                     r"^\[training\] seq_len=0 must be a positive number of tokens, e.g. 256$"),
    "negative-seq-len": (lambda tmp: (DEBUG_TOML, ["--training.seq_len", "-16"]),
                         r"^\[training\] seq_len=-16 must be a positive number of tokens"),
    "chunk-misaligned-seq-len": (lambda tmp: (DEBUG_TOML, ["--training.seq_len", "250"]),
                                 r"seq_len=250 is not a multiple of chunk_size=16"),
    "token-id-beyond-vocab": (lambda tmp: (DEBUG_TOML, ["--model.hf_assets_path",
                                                        str(sparse_ids_tokenizer(tmp))]),
                              r"has token ids up to 4000 but the model's vocab_size is 2048: use "
                              r"the model's tokenizer or a flavor with a larger vocabulary"),
    "tokenizer-json-empty-object": (lambda tmp: (DEBUG_TOML, ["--model.hf_assets_path",
                                                              str(tokenizer_folder(tmp, "{}"))]),
                                    r"^\[model\] hf_assets_path: .*tokenizer.json is not a valid "
                                    r"tokenizer \(Model missing. at line 1 column 2\): point it at "
                                    r"the model's tokenizer"),
    "bad-tokenizer-config": (lambda tmp: (DEBUG_TOML, ["--model.hf_assets_path", str(
        tokenizer_folder(tmp, tokenizer_config="{bos"))]),
        r"^\[model\] hf_assets_path: .*tokenizer_config.json is not valid JSON"),
    "missing-tokenizer": (lambda tmp: (DEBUG_TOML, ["--model.hf_assets_path", str(tmp / "nope")]),
                          r"no tokenizer.json in .*nope.*: set \[model\] hf_assets_path"),
    # Settings torchtitan takes that would train wrongly or fail late (infra/settings.py, job.py).
    "clipping-zero": (lambda tmp: (DEBUG_TOML, ["--training.max_norm", "0"]),
                      r"^\[training\] max_norm=0.0: torchtitan scales gradients by max_norm / "
                      r"norm, so this zeroes them .*: use a positive norm, or a large one"),
    "clipping-negative": (lambda tmp: (DEBUG_TOML, ["--training.max_norm", "-1"]),
                          r"max_norm=-1.0: .* so this reverses them"),
    "cp-balancer-ptrr": (lambda tmp: (DEBUG_TOML, ["--parallelism.context_parallel_degree", "2",
                                                   "--parallelism.context_parallel_load_balancer",
                                                   "ptrr"]),
                         r"^\[parallelism\] context_parallel_load_balancer='ptrr': RAT's context "
                         r"parallel splits sequences 'headtail' \(the default\) or contiguously"),
    "cp-validation-seq-len": (lambda tmp: (DEBUG_TOML, ["--parallelism.context_parallel_degree",
                                                        "2", "--validation.seq_len", "48"]),
                              r"^\[validation\] seq_len=48 must split into 4 context-parallel "
                              r"pieces of whole chunks: use a multiple of 64$"),
    "pinned-async-checkpoint-on-cpu": (
        lambda tmp: (DEBUG_TOML, ["--checkpoint.enable", "--checkpoint.async_mode",
                                  "async_with_pinned_mem"]),
        r"async_mode='async_with_pinned_mem' needs CUDA .*: on CPU ranks use 'async'"),
    "float8-with-tp-on-cpu": (
        lambda tmp: (DEBUG_TOML, ["--model.converters", "quantize.linear.float8",
                                  "--parallelism.tensor_parallel_degree", "2"]),
        r"converters='quantize.linear.float8' with tensor_parallel_degree > 1 cannot run on CPU "
        r"ranks \(gloo has no float8 collectives\)"),
    "selective-ac-option": (lambda tmp: (DEBUG_TOML, ["--activation_checkpoint.mode",
                                                      "selective",
                                                      "--activation_checkpoint.selective_ac_option",
                                                      "foo"]),
                            r"^\[activation_checkpoint\] selective_ac_option='foo': give 'op'"),
    "memory-budget-without-compile": (
        lambda tmp: (DEBUG_TOML, ["--activation_checkpoint.mode", "memory_budget"]),
        r"mode='memory_budget' is a compiler pass: set \[compile\] enable = true"),
    "async-tp-without-compile": (
        lambda tmp: (DEBUG_TOML, ["--parallelism.tensor_parallel_degree", "2",
                                  "--parallelism.enable_async_tensor_parallel"]),
        r"enable_async_tensor_parallel needs compiled blocks on CUDA"),
    "float8-without-emulate-on-cpu": (
        lambda tmp: (DEBUG_TOML, ["--model.converters", "quantize.linear.float8"]),
        r"converters='quantize.linear.float8' needs an SM89\+ GPU, or "
        r"--quantize.linear.float8.emulate without compiled blocks"),
    "pipeline-parallel": (lambda tmp: (DEBUG_TOML, ["--parallelism.pipeline_parallel_degree", "2"]),
                          r"^\[parallelism\] pipeline_parallel_degree=2: RAT models have no "
                          r"pipeline plan"),
    "cpu-offload-on-cpu": (lambda tmp: (DEBUG_TOML, ["--training.enable_cpu_offload"]),
                           r"^\[training\] enable_cpu_offload = true on CPU ranks"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_job_is_a_one_line_config_error(case, tmp_path, debug_assets, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name paths relative to the repo root
    make, pattern = CASES[case]
    config, overrides = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        trainer_setup(config, *overrides)
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


@pytest.mark.parametrize("section", ["training", "validation"])
def test_an_unknown_dataset_is_a_one_line_config_error(section):
    """torchtitan raised a ValueError with its traceback ("Dataset x is not supported")."""
    job = ConfigManager().parse_args(["--job.config_file", str(DEBUG_TOML), "--validation.enable",
                                      f"--{section}.dataset", "fineweb_edu_val"])
    build = ts.build_dataloader if section == "training" else ts.build_rat_validator
    with pytest.raises(ConfigError) as info:
        build(job_config=job, dp_world_size=1, dp_rank=0, tokenizer=None)
    assert re.fullmatch(rf"\[{section}\] dataset='fineweb_edu_val' is unknown: choose one of "
                        r"\[.*'fineweb_edu_validation'.*'rat_debug'.*\] \(--" + section +
                        r".dataset\)", str(info.value)), str(info.value)


def test_a_sound_job_passes(debug_assets, monkeypatch):
    monkeypatch.chdir(REPO)
    trainer_setup(DEBUG_TOML)


def test_settings_the_plugin_completes():
    """float8 keeps RAT's grouped wq/wk and the tied head in high precision whatever the TOML
    filters (the README's promise), and a TOML's "None" balancer is None (TOML has no None)."""
    job = ConfigManager().parse_args([
        "--job.config_file", str(DEBUG_TOML), "--model.converters", "quantize.linear.float8",
        "--quantize.linear.float8.emulate", "--quantize.linear.float8.filter_fqns", "w3", "--parallelism.context_parallel_degree",
        "2", "--parallelism.context_parallel_load_balancer", "None "])
    check_settings(job, "rat", 16)
    assert job.quantize.linear.float8.filter_fqns == ["w3", "output", "mixer.wq", "mixer.wk"]
    assert job.parallelism.context_parallel_load_balancer is None


def run_plugin_trainer(dump: Path, config: Path, *overrides: str):
    """``python -m rat_plugin.train`` (one process) from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "rat_plugin.train", "--job.config_file", str(config),
         "--job.dump_folder", str(dump), *overrides],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_under_torchrun_a_config_error_is_one_line(tmp_path, debug_assets):
    """Two ranks, a TOML without [model] name (torchtitan would build llama3). The first rank to
    fail prints the one line (infra/errors.py), the other nothing; torchrun's report gives the
    line instead of its traceback, and for the other rank a pointer to it. What remains is
    torchrun's own summary (its traceback and per-rank table)."""
    run = launch(str(toml_without(tmp_path, 'name = "rat"')), tmp_path / "dump")
    line = "ConfigError: [model] name='llama3' (torchtitan's default: [model] name is not set)"
    assert run.returncode != 0
    lines = run.stdout.splitlines()
    printed_by_ranks = [l for l in lines if re.match(rf"(\[rank\d\]: )?{re.escape(line)}", l)]
    assert len(printed_by_ranks) == 1, run.stdout
    report = [l.split("traceback : ", 1)[1] for l in lines if "traceback : " in l]
    assert sum(r.startswith(line) for r in report) == 1, run.stdout
    assert all(r.startswith((line, "the same error as node 0, rank ")) for r in report), report
    assert run.stdout.count("Traceback (most recent call last)") == 1  # torchrun's own
    assert not [l for l in lines if re.search(r'File ".*(rat_plugin|torchtitan)/', l)], run.stdout
    assert len(lines) < 60, run.stdout  # it was 93 with the ranks' tracebacks


@pytest.mark.slow
def test_plugin_entry_point_needs_no_custom_import(tmp_path, debug_assets):
    """Without [experimental] custom_import, torchtitan.train never loads the plugin (and on a
    CPU-only host dies in _cuda_setDevice); rat_plugin.train loads it anyway, so a bad setting
    still ends in the plugin's one line, here seq_len 0 (a ZeroDivisionError in the FLOP count
    before)."""
    config = toml_without(tmp_path, 'custom_import = "rat_plugin.train_spec"')
    run = run_plugin_trainer(tmp_path / "dump", config, "--training.seq_len", "0")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith(
        "ConfigError: [training] seq_len=0 must be a positive number of tokens, e.g. 256")


def data_folder(tmp_path: Path, train: int | None = None, validation: int | None = None) -> Path:
    """A copy of the debug corpus with its splits cut to so many documents (None: all)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, keep in (("train", train), ("validation", validation)):
        lines = (REPO / "assets" / "data" / "rat_debug" / f"{split}.jsonl").read_text().splitlines()
        kept = lines if keep is None else lines[:keep]
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in kept))
    return folder


def launch_bounded(dump: Path, *overrides: str, timeout: int = 240):
    """``launch`` on rat_debug.toml, 2 ranks; a run still going after ``timeout`` seconds fails
    the test, its ranks killed (found by the run's own dump folder in their command line)."""
    try:
        return launch("rat_debug.toml", dump, *overrides, timeout=timeout)
    except subprocess.TimeoutExpired:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(dump).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        pytest.fail(f"the run hung: still running after {timeout} s")


# id -> (documents in train.jsonl, in validation.jsonl; None: all), regex of the ConfigError.
# One document for two ranks: datasets' split fails on rank 1 (an IndexError traceback); none:
# each rank loops forever looking for data (the reported hang).
NO_DATA = {
    "training-share-empty": (1, None, r"\[training\] dataset 'rat_debug' at .*data gives "
                                      r"data-parallel rank\(s\) \[1\] of 2 no documents"),
    "validation-empty": (None, 0, r"\[validation\] dataset 'rat_debug_validation' at .*data "
                                  r"holds no documents: point \[validation\] dataset_path"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(NO_DATA))
def test_a_dataset_without_documents_for_a_rank_stops_every_rank(case, tmp_path, debug_assets):
    """A rank whose share of a split is empty looped forever looking for data (the others
    waited for it), or failed in datasets' split with an IndexError: now every rank stops
    with the one line before training (torchrun's report names both)."""
    train, validation, pattern = NO_DATA[case]
    data = data_folder(tmp_path, train, validation)
    run = launch_bounded(tmp_path / "dump", "--training.dataset_path", str(data),
                         "--validation.dataset_path", str(data), "--training.steps=2",
                         "--training.seq_len=64", "--validation.seq_len=64",
                         "--training.local_batch_size=2", "--validation.local_batch_size=2",
                         "--validation.freq=1")
    assert run.returncode != 0
    lines = run.stdout.splitlines()
    report = [l.split("traceback : ", 1)[1] for l in lines if "traceback : " in l]
    assert len(report) == 2, run.stdout[-3000:]  # both ranks raised it (none was killed)
    assert all(re.match("ConfigError: " + pattern, r) for r in report), report
    assert not [l for l in lines if re.search(r'File ".*(rat_plugin|torchtitan|datasets)/', l)], \
        run.stdout[-3000:]
    assert "Training starts" not in run.stdout

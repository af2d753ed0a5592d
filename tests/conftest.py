"""Shared fixtures: the generated debug assets and a launcher for the real trainer."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def debug_assets() -> Path:
    """The debug corpus and tokenizer under REPO/assets, generated (idempotently) before any
    test runs: several test files read them."""
    from rat_plugin.data.prepare import prepare

    prepare(REPO / "assets")
    return REPO / "assets"


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, debug_assets) -> Path:
    """A converted small rat model folder (2 layers, vocabulary 1024) with the debug tokenizer."""
    import torch.distributed.checkpoint as dcp

    from rat_plugin.convert import ModelSpec, dcp_to_standalone
    from rat_plugin.model import RATModel, make_args

    root = tmp_path_factory.mktemp("small_model")
    torch.manual_seed(0)
    args = make_args("rat", "debugmodel", dim=64, n_layers=2, ffn_hidden_dim=128,
                     vocab_size=1024, max_seq_len=64)
    model = RATModel(args)
    model.init_weights()
    dcp.save(model.state_dict(), checkpoint_id=str(root / "step-1"), no_dist=True)
    dcp_to_standalone(root / "step-1", root / "model", ModelSpec("rat", "debugmodel", args, "test"),
                      tokenizer_dir=debug_assets / "tokenizer", log=lambda _: None)
    return root / "model"


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (small models run faster without OpenMP hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Lift torch's CPU guard against flex_attention backward inside one test (what the GPU
    recipe's dry run does for a whole trainer run: rat_plugin/dry_run.py)."""
    import torch.nn.attention.flex_attention as flex_frontend

    monkeypatch.setattr(flex_frontend, "_validate_device", lambda query, key, value: None)


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command-line ``main(argv)``, usage errors included."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def launch(config: str, dump_folder: Path, *overrides: str, nproc: int = 2, timeout=300):
    """Run ``torchrun -m torchtitan.train`` on ``config`` (a file of train_configs/, or a path)
    from the repo root; returns the CompletedProcess (stdout and stderr merged)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--standalone", "-m", "torchtitan.train",
        "--job.config_file", str(REPO / "train_configs" / config),
        "--job.dump_folder", str(dump_folder), *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


class SeedCheckpoints:
    """Seed checkpoints (model weights at init, ``--checkpoint.create_seed_checkpoint``), one per
    debug config, written once per session and loaded by every trainer run that is compared with
    another (``--checkpoint.initial_load_path``): sharded runs would draw a different init."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}

    def __call__(self, config: str) -> Path:
        if config not in self._paths:
            dump = self.root / config
            run = launch(config, dump, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                         "--parallelism.data_parallel_shard_degree=1", nproc=1)
            assert run.returncode == 0, run.stdout[-4000:]
            self._paths[config] = dump / "checkpoint" / "step-0"
            assert (self._paths[config] / ".metadata").is_file()
        return self._paths[config]


@pytest.fixture(scope="session")
def seed_checkpoint(tmp_path_factory) -> SeedCheckpoints:
    return SeedCheckpoints(tmp_path_factory.mktemp("seeds"))


def tb_losses(dump_folder: Path, tag: str = "loss_metrics/global_avg_loss") -> dict[int, float]:
    """step -> global average loss (or another scalar ``tag``, e.g. "validation_metrics/loss")
    from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for path in sorted(glob.glob(f"{dump_folder}/tb/**/events.out.tfevents.*", recursive=True)):
        events = EventAccumulator(path)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            losses.update({event.step: event.value for event in events.Scalars(tag)})
    return losses


def lively_folder(kind: str, root: Path) -> Path:
    """A small model folder (no tokenizer) whose greedy continuations vary (weights scaled up
    from the init, where the tied head would mostly repeat the last token)."""
    from rat_plugin.convert import ModelSpec, write_folder
    from rat_plugin.model import RATModel, make_args

    torch.manual_seed(1)
    args = make_args(kind, "debugmodel", dim=64, n_layers=2, ffn_hidden_dim=128, vocab_size=256,
                     chunk_size=4, max_seq_len=32, **({"swa_window": 6} if "swa" in kind else {}))
    model = RATModel(args)
    model.init_weights()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(8)
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    write_folder(state, ModelSpec(kind, "debugmodel", args, "test"), root / kind, log=lambda _: 0)
    return root / kind


@pytest.fixture(scope="session")
def isolated_export(small_model_dir, tmp_path_factory) -> dict:
    """tests/isolated_export.py on ``--to-hf`` exports, in a fresh interpreter that cannot
    import rat_plugin: ``python -I -S`` with, on sys.path, a folder of links to the installed
    packages but rat_plugin and torchtitan (no .pth file: one installs an editable rat_plugin),
    the working directory and HF_HOME in a temporary folder, the hub offline.
    ``lively`` (a ``lively_folder`` model) is loaded, generated from and trained; ``export``
    (of ``small_model_dir``, with its tokenizer) is evaluated with lm_eval. Returns its SPEC
    (inputs, folders) with ``results`` and ``samples``."""
    import json
    import shutil
    import site

    from rat_plugin.hf.export import folder_to_hf

    root = tmp_path_factory.mktemp("isolated")
    folder_to_hf(small_model_dir, root / "rat_export", log=lambda _: None)
    folder_to_hf(lively_folder("rat", root), root / "lively_export", log=lambda _: None)
    shutil.copytree(REPO / "tests" / "lm_eval_tasks", root / "tests" / "lm_eval_tasks")
    tasks = ["rat_story_choice", "rat_story_words", "rat_story_text"]
    packages = root / "site-packages"
    packages.mkdir()
    hidden = ("rat_plugin", "rat_titan", "__editable__", "torchtitan")
    for folder in map(Path, site.getsitepackages() + [site.getusersitepackages()]):
        for entry in folder.iterdir() if folder.is_dir() else ():
            link = packages / entry.name
            if entry.suffix != ".pth" and not entry.name.startswith(hidden) \
                    and not link.exists():
                link.symlink_to(entry)
    spec = {
        "site": [str(packages)],
        "export": str(root / "rat_export"), "lively": str(root / "lively_export"),
        "lively_source": str(root / "rat"), "out": str(root / "out"),
        "tasks": str(root / "tests" / "lm_eval_tasks"),
        "ids": [[1, 45, 97, 130, 31, 200, 17, 64, 90, 3, 5, 8, 13, 21, 34, 55, 89, 144]],
        "prompts": [[1, 45, 97, 130, 31, 200, 17, 64, 90], [7, 200]], "new_tokens": 20,
        "train": [[1, 45, 97, 130, 31, 200, 17, 64], [1, 201, 2, 77, 8, 9, 10, 11]],
        # name -> (extra model_args, tasks): lm_eval's defaults, and rolling perplexity with
        # add_bos_token=False (its prefix token is then the only BOS; README, lm-eval).
        "lm_eval": {"default": ("", tasks), "rolling": (",add_bos_token=False", tasks[2:])},
    }
    (root / "out").mkdir()
    (root / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-I", "-S", str(REPO / "tests" / "isolated_export.py"),
         str(root / "spec.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-6000:]
    spec["results"] = json.loads((root / "out" / "results.json").read_text())
    spec["samples"] = json.loads((root / "out" / "samples.json").read_text())
    return spec

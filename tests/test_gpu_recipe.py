"""The GPU recipe's dry run: every shipped GPU config through torchtitan's own trainer on two CPU
ranks (``tools/dry_run.py``: debug size, the GPU kernel choice, compile with aot_eager), from a
seed checkpoint, against the eager portable run of the same model (no compile, no AC, portable
kernels, fp32, float8 off) from the same seed. Both shard the model with FSDP2 over the two ranks
and accumulate two micro-batches per step, so they see the same data.

The recipes pack documents document-aware ([rat] document_aware = true), training and held-out
data alike, so the dry runs check the document masks in the GPU program too. In fp32 the
training and validation losses must agree within 1e-4 (measured: 5e-7); the shipped bf16
parameters and float8 track the fp32 run within their rounding. With create_block_mask inside
the compiled checkpointed blocks (before the BlockMasks came from tensor ops) every dry run
crashed at step 1.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, launch, tb_losses

sys.path.insert(0, str(REPO / "tools"))
import dry_run  # noqa: E402
from dry_run import debug_size, dry_run_options  # noqa: E402

STEPS = 4
PORTABLE = ("--compile.no-enable", "--activation_checkpoint.mode=none",
            "--rat.scan_kernel=torch", "--rat.attention_kernel=torch")
GPU_PROGRAM = (
    "RAT kernels: scan=triton (Triton custom op, CPU body), attention=flex (flex_attention)",
    "Document-aware packing (chunk_size=16)",
    "dry run: auto as on CUDA",
    "Compiling each TransformerBlock",
    "Applied selective activation checkpointing",
    "Applied FSDP",
    f"Saving a model only checkpoint in torch.bfloat16 at last step, step {STEPS}",
)
FLOAT8 = ("Float8 training active with recipe tensorwise", "Swapped to Float8Linear")
# Fine-tuning: instruction examples packed whole (the generated QA set, rat_longqa).
SFT_PROGRAM = tuple(line for line in GPU_PROGRAM if not line.startswith("Document-aware")) + (
    "Instruction packing (rat_longqa, template 'rat_longqa', seq_len=256, chunk_size=16)",)


@dataclass(frozen=True)
class Recipe:
    config: str
    portable_config: str  # the same model without float8
    seed_config: str  # the debug config of the same model kind (its seed checkpoint)
    fp32: bool = True
    tolerance: float = 1e-4
    expect: tuple[str, ...] = GPU_PROGRAM
    sft: bool = False  # a fine-tuning config: the dry run's QA data
    options: tuple[str, ...] = ()  # for both runs


RECIPES = {
    "rat_1p3b": Recipe("rat_1p3b.toml", "rat_1p3b.toml", "rat_debug.toml"),
    "rat_swa_1p3b": Recipe("rat_swa_1p3b.toml", "rat_swa_1p3b.toml", "rat_swa_debug.toml"),
    # float8 rounds matmul inputs to 3 mantissa bits: the float8 tolerance of
    # test_trainer_parallel.py (measured here: 0.0016).
    "rat_1p3b_float8": Recipe("rat_1p3b_float8.toml", "rat_1p3b.toml", "rat_debug.toml",
                              tolerance=3e-2, expect=GPU_PROGRAM + FLOAT8),
    # As shipped: bf16 parameters, fp32 reductions and accumulation (measured: 0.0011).
    "rat_1p3b-bf16": Recipe("rat_1p3b.toml", "rat_1p3b.toml", "rat_debug.toml", fp32=False,
                            tolerance=1e-2),
    # The SFT recipe's program (answer-only loss, packed examples); at its lr of 1e-5 four steps
    # from a seed at init would not move the loss, so both runs take the pretraining lr.
    "rat_1p3b_sft": Recipe("rat_1p3b_sft.toml", "rat_1p3b_sft.toml", "rat_debug.toml",
                           expect=SFT_PROGRAM, sft=True, options=("--optimizer.lr=8e-4",)),
}


class Runs:
    """Trainer runs under one folder; the eager portable run of each model is shared."""

    def __init__(self, root: Path, seed_checkpoint):
        self.root, self.seed_checkpoint = root, seed_checkpoint
        self._portable: dict[str, dict[int, float]] = {}

    def losses(self, name: str, config: str, seed_config: str, *options: str):
        """(per-step losses from TensorBoard, log) of a 2-rank run from the seed checkpoint."""
        seed = self.seed_checkpoint(seed_config)
        run = launch(config, self.root / name, *options,
                     f"--checkpoint.initial_load_path={seed}", nproc=2)
        assert run.returncode == 0, run.stdout[-4000:]
        assert f"Loading the checkpoint from {seed}" in run.stdout
        losses = tb_losses(self.root / name)
        assert sorted(losses) == list(range(1, STEPS + 1))
        return losses, run.stdout

    def portable(self, recipe: Recipe) -> dict[int, float]:
        config = recipe.portable_config
        if config not in self._portable:
            losses, log = self.losses(f"portable-{config}", config, recipe.seed_config,
                                      *debug_size(fp32=True, sft=recipe.sft), *PORTABLE,
                                      *recipe.options)
            assert "RAT kernels: scan=torch (portable), attention=torch (portable)" in log
            assert "Compiling each TransformerBlock" not in log
            assert losses[STEPS] < losses[1] - 0.5, losses  # the steps really train
            self._portable[config] = losses
        return self._portable[config]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, seed_checkpoint) -> Runs:
    return Runs(tmp_path_factory.mktemp("gpu_recipe"), seed_checkpoint)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(RECIPES))
def test_gpu_recipe_dry_run_matches_the_eager_portable_run(name, runs):
    recipe = RECIPES[name]
    want = runs.portable(recipe)
    got, log = runs.losses(name, recipe.config, recipe.seed_config,
                           *dry_run_options(fp32=recipe.fp32, sft=recipe.sft), *recipe.options)
    for line in recipe.expect:
        assert line in log, f"{line!r} not in the log of the {name} dry run"
    checkpoints = sorted(p.name for p in (runs.root / name / "checkpoint").iterdir())
    assert checkpoints == ["step-2", f"step-{STEPS}"]
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= recipe.tolerance, f"dry run {got} vs eager portable {want}: {worst:.2e}"
    # The held-out loss at steps 1 and 4: the GPU program validates (compiled, under no_grad).
    got, want = (tb_losses(runs.root / run, "validation_metrics/loss")
                 for run in (name, f"portable-{recipe.portable_config}"))
    assert sorted(got) == sorted(want) == [1, STEPS]
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= recipe.tolerance, f"validation {got} vs eager portable {want}: {worst:.2e}"


def test_dry_run_tool_passes_trainer_options_after_a_double_dash(monkeypatch):
    commands = []
    monkeypatch.setattr(dry_run.subprocess, "call", lambda cmd: commands.append(cmd) or 0)
    assert dry_run.main(["train_configs/rat_1p3b.toml", "--fp32", "--dump-folder", "/tmp/d",
                         "--", "--training.steps=8"]) == 0
    (cmd,) = commands
    assert cmd[cmd.index("--job.config_file") + 1] == "train_configs/rat_1p3b.toml"
    assert cmd[-2:] == ["--job.dump_folder=/tmp/d", "--training.steps=8"]
    assert set(dry_run_options(fp32=True)) <= set(cmd)


def test_dry_run_tool_gives_a_fine_tuning_config_the_qa_data(monkeypatch):
    commands = []
    monkeypatch.setattr(dry_run.subprocess, "call", lambda cmd: commands.append(cmd) or 0)
    assert dry_run.main(["train_configs/rat_1p3b_sft.toml"]) == 0
    (cmd,) = commands
    assert "--training.dataset=rat_longqa" in cmd and "--training.dataset=rat_debug" not in cmd
    assert "--checkpoint.initial_load_path=" in cmd  # from scratch: no pretrained weights here

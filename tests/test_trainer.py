"""End to end: torchtitan's own trainer (torchrun, 2 CPU ranks, FSDP2 over gloo) on the debug
configs: the loss falls, TensorBoard logs are written, and a DCP checkpoint resumes exactly."""

import re
import shutil

import pytest

from conftest import launch, tb_losses

STEPS, SAVE_AT = 20, 16
FAST = ("--training.local_batch_size=4",)  # the shipped configs, half the batch: quicker
LOSS_LINE = re.compile(r"(?<!validate )step:\s*(\d+)\s+loss:\s*([0-9.]+)")  # not validation


def logged_losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(output)}


def assert_ok(run) -> None:
    assert run.returncode == 0, run.stdout[-4000:]


@pytest.fixture(scope="module")
def rat_run(debug_assets, tmp_path_factory):
    """The uninterrupted reference run, saving a checkpoint at SAVE_AT."""
    dump = tmp_path_factory.mktemp("rat_debug")
    run = launch("rat_debug.toml", dump, *FAST, f"--training.steps={STEPS}", "--checkpoint.enable",
                 f"--checkpoint.interval={SAVE_AT}")
    assert_ok(run)
    return dump, run.stdout


def assert_loss_falls(dump, output) -> None:
    losses = logged_losses(output)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 1.0, (first, last)
    # TensorBoard has the same curve (the log line rounds to 5 decimals).
    tb = tb_losses(dump)
    assert sorted(tb) == sorted(losses)
    assert all(abs(tb[s] - losses[s]) < 1e-4 for s in losses)


@pytest.mark.slow
def test_rat_debug_trains(rat_run):
    assert_loss_falls(*rat_run)


@pytest.mark.slow
def test_rat_swa_debug_trains(debug_assets, tmp_path):
    run = launch("rat_swa_debug.toml", tmp_path, *FAST, f"--training.steps={STEPS}")
    assert_ok(run)
    assert "Building rat_swa debugmodel" in run.stdout
    assert_loss_falls(tmp_path, run.stdout)


@pytest.mark.slow
def test_checkpoint_resume_reproduces_losses(rat_run, tmp_path):
    reference_dump, _ = rat_run
    saved = reference_dump / "checkpoint" / f"step-{SAVE_AT}"
    assert (saved / ".metadata").exists()
    shutil.copytree(saved, tmp_path / "checkpoint" / f"step-{SAVE_AT}")

    run = launch("rat_debug.toml", tmp_path, *FAST, f"--training.steps={STEPS}",
                 "--checkpoint.enable",
                 f"--checkpoint.interval={SAVE_AT}")
    assert_ok(run)
    assert f"Training starts at step {SAVE_AT + 1}" in run.stdout
    resumed, reference = tb_losses(tmp_path), tb_losses(reference_dump)
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in resumed:
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])

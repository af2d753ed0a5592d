"""Trainer faults: damaged or model-only checkpoints on resume, and non-finite values in
training. The table checks what the plugin decides about a checkpoint folder before torchtitan
loads it (in process); the guards are checked on torchtitan's own optimizer container; the slow
tests resume the real trainer from a damaged checkpoint, from a NaN-rotted one and from a
finished run's model-only last save."""

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims

from conftest import REPO, launch, tb_losses
from rat_plugin.infra import ConfigError, DiskFullError, NonFiniteError
from rat_plugin.infra.guards import build_guarded_optimizers, finite_loss
from rat_plugin.infra.resume import check_resume
from rat_plugin.infra.saving import explain_full_disk

DEBUG_TOML = str(REPO / "train_configs" / "rat_debug.toml")


def save_step(folder: Path, step: int, full: bool = True) -> Path:
    """A small checkpoint in torchtitan's layout: flat model entries, and for a full one the
    optimizer, scheduler, data loader (pickled bytes) and train states."""
    torch.manual_seed(step)
    state = {"tok_embeddings.weight": torch.randn(8, 4), "norm.weight": torch.ones(4)}
    if full:
        state.update(optimizer={"state": {"norm.weight": {"exp_avg": torch.zeros(4)}}},
                     lr_scheduler={"last_epoch": step}, dataloader={"dp_rank_0": b"position"},
                     train_state={"step": step})
    path = folder / f"step-{step}"
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def storage_of(path: Path, fqn: str):
    """(file, offset, length) of entry ``fqn`` in a DCP checkpoint."""
    metadata = FileSystemReader(str(path)).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    return path / info.relative_path, info.offset, info.length


def truncate(path: Path) -> None:
    for data in path.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def overwrite(path: Path, fqn: str, byte: bytes) -> None:
    """Replace entry ``fqn``'s stored bytes in place (same size: bit rot, not truncation)."""
    file, offset, length = storage_of(path, fqn)
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(byte * length)


def full_steps(*steps):
    def make(folder: Path) -> None:
        for step in steps:
            save_step(folder, step)
    return make


def then(make, spoil):
    def run(folder: Path) -> None:
        make(folder)
        spoil(folder)
    return run


def unfinished(step):  # a save killed before DCP wrote .metadata
    def spoil(folder: Path) -> None:
        (folder / f"step-{step}").mkdir()
        (folder / f"step-{step}" / "__0_0.distcp").write_bytes(b"partial")
    return spoil


def model_only(step):
    return lambda folder: save_step(folder, step, full=False)


def saved_in_hf(step):  # what last_save_in_hf writes (torchtitan finds it by the index file)
    def make(folder: Path) -> None:
        (folder / f"step-{step}").mkdir()
        (folder / f"step-{step}" / "model.safetensors.index.json").write_text("{}")
    return make


# id -> (folder set-up, extra options, regex of the ConfigError or None, regex of a log line).
RESUME_CASES = {
    "newest-sound": (full_steps(1, 2), [], None, None),
    "newest-truncated": (then(full_steps(1, 2), lambda f: truncate(f / "step-2")), [],
                         r"step-2 is corrupt \(__0_0.distcp is \d+ bytes but its metadata needs "
                         r"\d+\): resume from the newest sound checkpoint with "
                         r"--checkpoint.load_step=1, or move step-2 away$", None),
    "newest-pickled-state-rotted": (
        then(full_steps(1, 2), lambda f: overwrite(f / "step-2", "dataloader.dp_rank_0", b"\0")),
        [], r"step-2 is corrupt \(dataloader.dp_rank_0 in __0_0.distcp is unreadable \(\w+\)\): "
            r"resume .* --checkpoint.load_step=1", None),
    "newest-metadata-garbage": (
        then(full_steps(1, 2), lambda f: (f / "step-2" / ".metadata").write_bytes(b"\x80junk")),
        [], r"step-2 is corrupt \(.metadata is unreadable \(\w+\)\)", None),
    "newest-payload-missing": (
        then(full_steps(1, 2), lambda f: (f / "step-2" / "__0_0.distcp").unlink()), [],
        r"step-2 is corrupt \(__0_0.distcp is missing\)", None),
    "only-checkpoint-corrupt": (then(full_steps(1), lambda f: truncate(f / "step-1")), [],
                                r"no sound full checkpoint precedes it: move step-1 out of", None),
    "unfinished-save-skipped": (then(full_steps(1, 2), unfinished(3)), [], None,
                                r"checkpoint: skipping .*step-3: no .metadata \(a save that did "
                                r"not finish\)"),
    "newest-model-only": (then(full_steps(1), model_only(2)), [],
                          r"step-2 holds model weights only .*: resume the full state of step-1 "
                          r"with --checkpoint.load_step=1 \(this saves over step-2 when it gets "
                          r"there\), or start a new run from these weights with "
                          r"--checkpoint.initial_load_path=.*step-2 --checkpoint.folder=", None),
    "newest-saved-in-hf": (then(full_steps(1), saved_in_hf(2)), [],
                           r"step-2 was saved in Hugging Face format .*: resume step-1 with "
                           r"--checkpoint.load_step=1, or start a new run from these weights "
                           r"with --checkpoint.initial_load_path=.*step-2 "
                           r"--checkpoint.initial_load_in_hf --checkpoint.folder=", None),
    "model-only-and-nothing-older": (model_only(2), [], r"not the optimizer and data state to "
                                     r"resume: start a new run from these weights", None),
    "model-only-with-states-excluded": (
        model_only(2), ["--checkpoint.exclude_from_loading",
                        "optimizer,lr_scheduler,dataloader,train_state"], None, None),
    "seed-checkpoint-step-0": (model_only(0), [], None, None),
    "load-step-absent": (full_steps(1, 2), ["--checkpoint.load_step", "5"],
                         r"load_step=5: .* has no complete step-5; complete steps: \[1, 2\]$", None),
    "renamed-copy-of-a-newer-step": (
        then(full_steps(1, 2), lambda f: (f / "step-2").rename(f / "backup-step-3")), [],
        r"backup-step-3 counts as step 3 for torchtitan \(any name containing step-N\), which "
        r"then loads step-3, absent: rename it or move it out of .*checkpoint$", None),
    "renamed-copy-beside-its-step": (
        then(full_steps(1, 2), lambda f: shutil.copytree(f / "step-2", f / "old-step-2")), [],
        None, None),
    "load-step-older-while-newest-corrupt": (
        then(full_steps(1, 2), lambda f: truncate(f / "step-2")),
        ["--checkpoint.load_step", "1"], None, None),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_checkpoint_is_checked(case, tmp_path, caplog):
    make, options, error, log = RESUME_CASES[case]
    folder = tmp_path / "dump" / "checkpoint"
    folder.mkdir(parents=True)
    make(folder)
    job = ConfigManager().parse_args(["--job.config_file", DEBUG_TOML, "--job.dump_folder",
                                      str(tmp_path / "dump"), "--checkpoint.enable", *options])
    if error is None:
        check_resume(job)
    else:
        with pytest.raises(ConfigError) as info:
            check_resume(job)
        message = str(info.value)
        assert "\n" not in message and re.search(error, message), message
    if log is not None:
        assert any(re.search(log, r.getMessage()) for r in caplog.records), caplog.text


def test_corrupt_initial_load_path_is_refused(tmp_path):
    seed = save_step(tmp_path, 0, full=False)
    truncate(seed)
    job = ConfigManager().parse_args(["--job.config_file", DEBUG_TOML, "--job.dump_folder",
                                      str(tmp_path / "dump"), "--checkpoint.enable",
                                      "--checkpoint.initial_load_path", str(seed)])
    with pytest.raises(ConfigError, match=r"initial_load_path=.*step-0 is corrupt: __0_0.distcp"):
        check_resume(job)
    job.checkpoint.initial_load_in_hf = True  # a DCP folder given as Hugging Face safetensors
    with pytest.raises(ConfigError, match=r"initial_load_path=.*step-0 holds no .safetensors "
                       r"files, but initial_load_in_hf reads them: point it at a step folder"):
        check_resume(job)


def test_non_finite_loss_stops_before_backward():
    loss_fn = finite_loss(lambda pred, labels: (pred - labels).square().sum())
    labels = torch.zeros(3)
    assert loss_fn(torch.ones(3), labels).item() == 3.0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match=rf"the loss is {bad} \(non-finite weights .*\): "
                           r"stopped before the optimizer step, so no checkpoint holds this state"):
            loss_fn(torch.tensor([1.0, bad, 0.0]), labels)


def test_non_finite_gradient_stops_before_the_optimizer_step():
    """A finite loss can still give an infinite gradient, which torchtitan's clipping would
    turn into NaN weights: the optimizer step is refused and the weights stay as they were."""
    job = ConfigManager().parse_args(["--job.config_file", DEBUG_TOML])
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    optimizers = build_guarded_optimizers([model], job.optimizer, dims)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 4)).sum().backward()
    optimizers.step()  # finite gradients: the step happens
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    stepped = [p.detach().clone() for p in model.parameters()]
    optimizers.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    model[1].weight.grad[0, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the gradient of 1.weight is not finite with a "
                       r"finite loss: stopped before the optimizer step"):
        optimizers.step()
    assert all(torch.equal(a, p) for a, p in zip(stepped, model.parameters()))
    model[1].weight.grad[0, 2] = float("nan")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as torchtitan clips: all NaN now
    with pytest.raises(NonFiniteError, match=r"the gradients of 4 of 4 parameters are not finite "
                       r"\(the first is 0.weight, but gradient clipping by a non-finite norm "
                       r"spreads one bad gradient to all\) with a finite loss"):
        optimizers.step()
    assert all(torch.equal(a, p) for a, p in zip(stepped, model.parameters()))


# What a full disk makes DCP raise: each rank's failure, wrapped.
SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", [SHORT_WRITE, NO_SPACE, PermissionError(13, "denied")],
                         ids=["short-write", "no-space", "permission"])
def test_a_save_out_of_space_is_one_line_naming_the_folder(failure, tmp_path, monkeypatch):
    """CheckpointManager.save, wrapped at plugin import: a failure for lack of space becomes
    a DiskFullError naming the folder and the space left; any other passes through."""
    def failing_save(self, curr_step, last_step=False):
        raise CheckpointException("CheckpointException ranks:dict_keys([0])",
                                  {0: (failure, None)})

    monkeypatch.setattr(CheckpointManager, "save", failing_save)
    explain_full_disk()
    manager = CheckpointManager.__new__(CheckpointManager)
    manager.folder = str(tmp_path / "dump" / "checkpoint")  # not created yet
    if isinstance(failure, PermissionError):
        with pytest.raises(CheckpointException):
            manager.save(3)
        return
    with pytest.raises(DiskFullError) as info:
        manager.save(3)
    reason = "unexpected pos 704 vs 598" if failure is SHORT_WRITE else "No space left on device"
    assert re.fullmatch(rf"saving the checkpoint of step 3 in {manager.folder} failed: the disk is "
                        rf"full \(.*{reason}\); [\d.]+ [GM]iB free there: free space, keep fewer "
                        r"checkpoints \(--checkpoint.keep_latest_k\) or point --job.dump_folder "
                        r"at a disk with room", str(info.value)), str(info.value)


# ----------------------------------------------------------------------------- the real trainer

RUN = ("--training.local_batch_size=2", "--training.seq_len=64", "--checkpoint.enable",
       "--checkpoint.interval=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, debug_assets) -> Path:
    """A finished 3-step run (one process) saving at every step: step-1 and step-2 full,
    step-3, the last, model-only (the shipped last_save_model_only = true)."""
    dump = tmp_path_factory.mktemp("finished")
    run = launch("rat_debug.toml", dump, *RUN, "--training.steps=3", nproc=1)
    assert run.returncode == 0, run.stdout[-3000:]
    return dump


def copy_steps(finished: Path, dump: Path, *steps: int) -> Path:
    folder = dump / "checkpoint"
    for step in steps:
        shutil.copytree(finished / "checkpoint" / f"step-{step}", folder / f"step-{step}")
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_line_failure(run, line: str) -> None:
    """A non-zero exit whose only traceback is torchrun's own, with ``line`` printed."""
    assert run.returncode != 0
    assert re.search(line, run.stdout), run.stdout[-3000:]
    assert run.stdout.count("Traceback (most recent call last)") == 1, run.stdout[-3000:]
    assert not re.search(r'File ".*(rat_plugin|torchtitan)/', run.stdout), run.stdout[-3000:]


def rot_to_nan(step_dir: Path, fqn: str, numel: int) -> None:
    """Overwrite the stored values of ``fqn`` with NaN bit patterns, in place: the file keeps
    its size and structure, as with bit rot inside a tensor."""
    values = {fqn: torch.empty(numel)}
    dcp.load(values, checkpoint_id=str(step_dir), no_dist=True)
    raw = values[fqn].numpy().tobytes()
    file, offset, length = storage_of(step_dir, fqn)
    data = bytearray(file.read_bytes())
    start = data.index(raw, offset, offset + length)
    data[start:start + len(raw)] = b"\xff" * len(raw)
    file.write_bytes(bytes(data))


@pytest.mark.slow
def test_training_longer_after_a_model_only_last_save(finished_run, tmp_path):
    """The finished run's last save cannot be resumed: one line says so and how to go on, and
    nothing is written; following its advice resumes step-2 exactly."""
    folder = copy_steps(finished_run, tmp_path, 1, 2, 3)
    before = folder_bytes(folder)
    run = launch("rat_debug.toml", tmp_path, *RUN, "--training.steps=4", nproc=1)
    assert_one_line_failure(run, r"ConfigError: \[checkpoint\] .*step-3 holds model weights only "
                            r".*--checkpoint.load_step=2 ")
    assert folder_bytes(folder) == before

    run = launch("rat_debug.toml", tmp_path, *RUN, "--training.steps=4",
                 "--checkpoint.load_step=2", nproc=1)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Training starts at step 3" in run.stdout
    resumed, reference = tb_losses(tmp_path), tb_losses(finished_run)
    assert sorted(resumed) == [3, 4]
    assert abs(resumed[3] - reference[3]) <= 1e-6, (resumed, reference)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_named_on_resume(finished_run, tmp_path):
    folder = copy_steps(finished_run, tmp_path, 1, 2)
    truncate(folder / "step-2")
    unfinished(5)(folder)
    before = folder_bytes(folder)
    run = launch("rat_debug.toml", tmp_path, *RUN, "--training.steps=4", nproc=1)
    assert re.search(r"checkpoint: skipping .*step-5: no .metadata", run.stdout), run.stdout
    assert_one_line_failure(run, r"ConfigError: \[checkpoint\] .*step-2 is corrupt "
                            r"\(__0_0.distcp is \d+ bytes but its metadata needs \d+\): resume "
                            r"from the newest sound checkpoint with --checkpoint.load_step=1")
    assert folder_bytes(folder) == before


@pytest.mark.slow
def test_nan_in_resumed_weights_stops_before_the_next_save(finished_run, tmp_path):
    """Bit rot turning the final norm's weights into NaN: the resumed run stops at its first
    step with one line, before that step's checkpoint (interval 1) is saved."""
    folder = copy_steps(finished_run, tmp_path, 1)
    rot_to_nan(folder / "step-1", "norm.weight", numel=128)
    run = launch("rat_debug.toml", tmp_path, *RUN, "--training.steps=3", nproc=1)
    assert_one_line_failure(run, r"NonFiniteError: the loss is nan on rank 0 .*: stopped before "
                            r"the optimizer step, so no checkpoint holds this state")
    assert "Training starts at step 2" in run.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["step-1"]


# A custom_import for the trainer: the plugin, then DCP's files on a disk that fills after a few
# KiB (writes take what fits, then fail with ENOSPC, as a full file system does).
FILLING_DISK = """
import errno, io, os
from contextlib import contextmanager
import torch.distributed.checkpoint.filesystem as fs
import rat_plugin.train_spec  # noqa: F401

room = [4096]

class FillingFile(io.FileIO):
    def write(self, data):
        data = memoryview(data).cast("B")
        fits = min(len(data), room[0])
        room[0] -= fits
        if fits == 0 and len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data[:fits])

create_stream = fs.FileSystem.create_stream

@contextmanager
def filling_stream(self, path, mode):
    if "w" not in mode:
        with create_stream(self, path, mode) as stream:
            yield stream
        return
    with io.BufferedWriter(FillingFile(str(path), "wb")) as stream:
        yield stream

fs.FileSystem.create_stream = filling_stream
"""


@pytest.mark.slow
def test_a_disk_filling_during_a_checkpoint_save_is_one_line(tmp_path, monkeypatch, debug_assets):
    (tmp_path / "filling_disk.py").write_text(FILLING_DISK)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = launch("rat_debug.toml", tmp_path / "dump", *RUN, "--training.steps=1",
                 "--experimental.custom_import", "filling_disk", nproc=1)
    assert_one_line_failure(run, r"DiskFullError: saving the checkpoint of step 1 in .*dump/"
                            r"checkpoint failed: the disk is full \(.*(unexpected pos|No space "
                            r"left on device).*\); [\d.]+ [GM]iB free there: free space")

"""The checkpoint a run resumes from, checked before torchtitan loads it.

torchtitan's CheckpointManager loads ``--checkpoint.load_step``, or else the newest ``step-N``
folder holding a ``.metadata`` file, as the full training state; a truncated payload then
fails deep in DCP (EOFError, UnpicklingError) and a model-only checkpoint (what
``last_save_model_only`` writes at the last step) with "Missing key ... dataloader". Run from
``update_from_config``, before the CheckpointManager exists, this module:

- logs each step folder it skips for having no ``.metadata`` (a save that did not finish);
- refuses, in one line naming the step and ``--checkpoint.load_step`` of the newest sound full
  checkpoint, a checkpoint whose metadata is unreadable, whose ``.distcp`` files are missing
  or shorter than the metadata says, or whose pickled states (data loader position, step,
  scheduler) do not unpickle;
- refuses a model-only checkpoint as a resume point, saying how to go on from it (also one
  saved in Hugging Face format, which torchtitan would load as DCP);
- checks ``initial_load_path`` the same way when it is what will be loaded.

Tensor payloads carry no checksum: bit rot inside a tensor passes, and is stopped by the
non-finite loss check (``guards.py``) if it produced NaN or inf.
"""

import io
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from rat_plugin.convert import TRAINER_STATES
from rat_plugin.infra import ConfigError

STEP = re.compile(r"step-(\d+)")  # what torchtitan's CheckpointManager matches (re.search)
HF_INDEX = "model.safetensors.index.json"  # a step saved in HF format: not DCP, not checked


def step_folders(folder: Path) -> dict[int, Path]:
    """Step -> a folder torchtitan counts as that step (the exact ``step-N`` where there is one:
    torchtitan counts any name containing step-N, then loads ``step-N``)."""
    found = {}
    for path in folder.iterdir():
        match = STEP.search(path.name)
        if match and path.is_dir():
            step = int(match.group(1))
            if step not in found or path.name == f"step-{step}":
                found[step] = path
    return found


def payload_problem(path: Path) -> str | None:
    """What makes the DCP checkpoint at ``path`` unloadable, None when nothing does."""
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # unpickling errors come in many types
        return f".metadata is unreadable ({type(err).__name__})"
    storage = metadata.storage_data or {}
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is {file.stat().st_size} bytes but its metadata needs {size}"
    for index, info in storage.items():
        item = metadata.state_dict_metadata.get(index.fqn)
        if isinstance(item, BytesStorageMetadata) and not info.transform_descriptors:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            try:
                torch.load(io.BytesIO(blob), weights_only=False)  # as DCP's load_bytes does
            except Exception as err:
                return f"{index.fqn} in {info.relative_path} is unreadable ({type(err).__name__})"
    return None


def missing_states(path: Path, required: set[str]) -> set[str]:
    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return required - {key.split(".", 1)[0] for key in entries}


def check_resume(job_config: JobConfig) -> None:
    """Check what the CheckpointManager will load; raise ConfigError if it cannot resume."""
    checkpoint = job_config.checkpoint
    if not checkpoint.enable:
        return
    folder = Path(job_config.job.dump_folder) / checkpoint.folder
    if not folder.is_dir():
        seed = checkpoint.initial_load_path
        if seed and not Path(seed).exists():
            raise ConfigError(
                f"[checkpoint] initial_load_path={seed} does not exist: point it at the weights "
                "to start from (a step folder of a run, or a seed from tools/convert_checkpoint.py "
                "--to-dcp), or clear it (--checkpoint.initial_load_path=) to start from scratch"
            )
        if seed and checkpoint.initial_load_in_hf and not any(Path(seed).glob("*.safetensors")):
            raise ConfigError(
                f"[checkpoint] initial_load_path={seed} holds no .safetensors files, but "
                "initial_load_in_hf reads them: point it at a step folder that last_save_in_hf "
                "wrote or a --to-hf export, or drop initial_load_in_hf for a DCP checkpoint"
            )
        if seed and not checkpoint.initial_load_in_hf and Path(seed).is_dir():
            problem = payload_problem(Path(seed))
            if problem:
                raise ConfigError(f"[checkpoint] initial_load_path={seed} is corrupt: {problem}")
        return
    steps = step_folders(folder)
    for path in (steps[s] for s in sorted(steps)):
        if not (path / ".metadata").is_file() and not (path / HF_INDEX).is_file():
            logger.warning(f"checkpoint: skipping {path}: no .metadata (a save that did not finish)")
    dcp_steps = {s: p for s, p in steps.items() if (p / ".metadata").is_file()}
    loadable = set(dcp_steps) | {s for s, p in steps.items() if (p / HF_INDEX).is_file()}
    step = checkpoint.load_step
    if step == -1:
        if not loadable:
            return  # nothing to resume from
        step = max(loadable)
        if step not in dcp_steps:  # torchtitan would load it as DCP and fail
            older = max(dcp_steps, default=None)
            resume = (f"resume step-{older} with --checkpoint.load_step={older}, or "
                      if older is not None else "")
            raise ConfigError(
                f"[checkpoint] {steps[step]} was saved in Hugging Face format "
                f"(last_save_in_hf: model weights only), which torchtitan does not resume: "
                f"{resume}start a new run from these weights with "
                f"--checkpoint.initial_load_path={steps[step]} --checkpoint.initial_load_in_hf "
                "--checkpoint.folder=<a new folder>"
            )
    if step in steps and steps[step].name != f"step-{step}":
        raise ConfigError(
            f"[checkpoint] {steps[step].name} counts as step {step} for torchtitan (any name "
            f"containing step-N), which then loads step-{step}, absent: rename it or move it out "
            f"of {folder}"
        )
    if step not in dcp_steps:
        raise ConfigError(
            f"[checkpoint] load_step={step}: {folder} has no complete step-{step}; complete "
            f"steps: {sorted(dcp_steps)}"
        )
    # torchtitan loads step 0 (a seed checkpoint) as model weights only.
    required = set() if step == 0 else set(TRAINER_STATES) - set(checkpoint.exclude_from_loading)

    def newest_sound_full(below: int) -> int | None:
        for s in sorted((s for s in dcp_steps if s < below), reverse=True):
            if payload_problem(dcp_steps[s]) is None and not missing_states(dcp_steps[s], required):
                return s
        return None

    path = dcp_steps[step]
    problem = payload_problem(path)
    if problem:
        good = newest_sound_full(step)
        fix = (f"resume from the newest sound checkpoint with --checkpoint.load_step={good}, or "
               f"move {path.name} away" if good is not None
               else f"no sound full checkpoint precedes it: move {path.name} out of {folder}")
        raise ConfigError(f"[checkpoint] {path} is corrupt ({problem}): {fix}")
    if missing_states(path, required):
        good = newest_sound_full(step)
        resume = (f"resume the full state of step-{good} with --checkpoint.load_step={good} "
                  f"(this saves over {path.name} when it gets there), or " if good is not None
                  else "")
        raise ConfigError(
            f"[checkpoint] {path} holds model weights only (checkpoint.last_save_model_only "
            f"saves the last step so), not the optimizer and data state to resume: {resume}"
            f"start a new run from these weights with --checkpoint.initial_load_path={path} "
            "--checkpoint.folder=<a new folder>; set last_save_model_only = false for runs "
            "you mean to extend"
        )

"""Checkpoint saves that fail for lack of space end in one line saying so.

A full disk during torchtitan's checkpoint save surfaces as DCP's ``CheckpointException``
wrapping, per rank, ``OSError: No space left on device`` or, when torch's zip writer got a short
write, ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos N vs M``, under a
traceback that never mentions space. ``explain_full_disk`` (applied once by
``rat_plugin.train_spec`` at import) wraps ``CheckpointManager.save`` so such a failure raises a
``DiskFullError`` naming the checkpoint folder and the space left there; DCP gathers every rank's
failure, so each rank prints it. Any other failure passes through unchanged.
"""

import errno
import functools
import shutil
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.components.checkpoint import CheckpointManager

from rat_plugin.infra import DiskFullError

SHORT_WRITE = "unexpected pos"  # torch's zip writer wrote fewer bytes than it gave the file


def _causes(err: BaseException):
    """``err``, what it was raised from, and each rank's failure of a CheckpointException."""
    seen, pending = set(), [err]
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        pending += [err.__cause__, err.__context__]
        if isinstance(err, CheckpointException):
            pending += [failure[0] for failure in err.failures.values()
                        if isinstance(failure, tuple)]


def out_of_space(err: BaseException) -> str | None:
    """The reason, when ``err`` is a write that ran out of space (None otherwise)."""
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return cause.strerror or str(cause)
        text = str(cause)
        if SHORT_WRITE in text or "No space left on device" in text:
            line = next((l for l in text.splitlines() if SHORT_WRITE in l or "space" in l), text)
            return line.strip()[-120:]
    return None


def free_space(folder: str) -> str:
    """Free space on the file system of ``folder`` (or of its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def explain_full_disk() -> None:
    """Wrap ``CheckpointManager.save`` (once) so a save failing for lack of space raises
    DiskFullError."""
    save = CheckpointManager.save
    if getattr(save, "explains_full_disk", False):
        return

    @functools.wraps(save)
    def checked_save(self, curr_step: int, last_step: bool = False) -> None:
        try:
            return save(self, curr_step, last_step)
        except BaseException as err:  # CheckpointException is a BaseException
            reason = out_of_space(err)
            if reason is None:
                raise
            raise DiskFullError(
                f"saving the checkpoint of step {curr_step} in {self.folder} failed: the disk is "
                f"full ({reason}); {free_space(self.folder)} free there: free space, keep fewer "
                "checkpoints (--checkpoint.keep_latest_k) or point --job.dump_folder at a disk "
                "with room"
            ) from err

    checked_save.explains_full_disk = True
    CheckpointManager.save = checked_save

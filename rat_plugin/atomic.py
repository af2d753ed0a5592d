"""Atomic folder output: write a folder next to its final path, then swap it in whole.

At every instant the output path holds the old complete folder or the new complete one:

- a new output is a complete temporary sibling renamed to the path (one atomic rename);
- a replacement exchanges the complete temporary sibling and the old folder in one
  ``renameat2(RENAME_EXCHANGE)`` call (Linux), then deletes the old one, now at the temporary
  path. Where the kernel or filesystem cannot exchange, the old folder is renamed to a
  ``.NAME.old-*`` sibling first; a kill between that rename and the next leaves no folder at
  the path until ``recover`` runs.

A killed run leaves ``.NAME.tmp-*`` siblings (a partial or complete new folder, or the old one
after the exchange) and, without exchange, ``.NAME.old-*``. ``recover``, run before every
write, puts a displaced old folder back when the path is empty and deletes the rest, saying
what it did.
"""

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries at ``a`` and ``b`` atomically; False where this system cannot."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def _leftovers(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}.{kind}-"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))


def recover(out: Path, log: Callable[[str], None] = print) -> None:
    """Repair what a killed write of ``out`` left: restore a displaced old folder when ``out``
    is missing, delete temporary siblings."""
    if not out.exists():
        displaced = [d / out.name for d in _leftovers(out, "old") if (d / out.name).is_dir()]
        if displaced:
            os.replace(displaced[-1], out)
            displaced[-1].parent.rmdir()
            log(f"restored {out} from {displaced[-1].parent.name} (an interrupted replacement)")
    for leftover in _leftovers(out, "tmp") + _leftovers(out, "old"):
        shutil.rmtree(leftover)
        log(f"removed {leftover.name}, left by an interrupted write of {out.name}")


def _set_default_modes(folder: Path) -> None:
    """mkdtemp and some writers create owner-only entries: give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``, replacing what is there."""
    if not out.exists():
        os.replace(tmp, out)
    elif exchange(tmp, out):
        shutil.rmtree(tmp)  # the old folder, now at the temporary path
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)
            raise
        shutil.rmtree(old)


@contextmanager
def atomic_dir(
    out_dir: str | os.PathLike, force: bool, log: Callable[[str], None] = print
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out_dir``; on success it becomes ``out_dir``.

    On an exception the temporary folder is removed and ``out_dir`` is left as it was. An
    existing ``out_dir`` is replaced only with ``force``, and only once the new one is complete.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out, log)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _set_default_modes(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Atomic folder output: write a folder next to its final path, then swap it in whole.

At every instant the output path holds the old complete folder or the new complete one:

- a new output is a complete temporary sibling renamed to the path (one atomic rename);
- a replacement exchanges the complete temporary sibling and the old folder in one
  ``renameat2(RENAME_EXCHANGE)`` call (Linux), then deletes the old one, now at the temporary
  path. Where the kernel or filesystem cannot exchange, the old folder is moved into a
  ``.NAME.old-*`` sibling first; a kill between that move and the next rename leaves no folder
  at the path until ``recover`` runs.

A killed run leaves ``.NAME.tmp-*`` siblings (a partial or complete new folder, or the old one
after the exchange) and, without exchange, ``.NAME.old-*``. ``recover``, run before every
write, puts a displaced old folder back when the path is empty and deletes the rest, saying
what it did. It touches only what this module can prove it made and no longer uses:

- a sibling's name ends in a random part and a check of (NAME, kind, random part), so another
  tool's or a person's ``.NAME.tmp-x`` is never ours;
- a writer holds an exclusive ``flock`` on its siblings while it runs (the kernel drops it when
  the process dies), so a concurrent write's siblings are left alone;
- the folders the run reads (``reads``: its source, its tokenizer) are kept even when one is a
  leftover of ours, with a line saying so.
"""

import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, a concurrent write's siblings are not recognised
    fcntl = None

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


def _check(out_name: str, kind: str, nonce: str) -> str:
    return hashlib.sha256(f"rat_plugin.atomic/{out_name}/{kind}/{nonce}".encode()).hexdigest()[:16]


def _is_ours(path: Path, out: Path, kind: str) -> bool:
    """``path`` is a ``kind`` sibling of ``out`` made by ``_new_sibling``: its name checks out."""
    prefix = f".{out.name}.{kind}-"
    nonce, _, check = path.name[len(prefix):].partition("-")
    return path.name.startswith(prefix) and check == _check(out.name, kind, nonce) \
        and path.is_dir() and not path.is_symlink()


def _lock(folder: Path) -> int | None:
    """An fd holding an exclusive flock on ``folder``; None when another process holds one or
    the folder is gone. Where the system has no locks, an fd (or -1) that holds none."""
    if fcntl is None:
        return -1
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a file system without locks
        pass
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def _new_sibling(out: Path, kind: str) -> tuple[Path, int | None]:
    """A fresh empty ``.NAME.kind-RANDOM-CHECK`` folder next to ``out``, locked."""
    while True:
        nonce = secrets.token_hex(8)
        path = out.parent / f".{out.name}.{kind}-{nonce}-{_check(out.name, kind, nonce)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path, _lock(path)


def _remove(path: Path) -> None:
    """rmtree, tolerating entries a concurrent ``recover`` removed first."""

    def onerror(function, name, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)


def recover(
    out: Path, log: Callable[[str], None] = print, reads: Iterable[str | os.PathLike] = ()
) -> None:
    """Repair what a killed write of ``out`` left: restore a displaced old folder when ``out``
    is missing, delete temporary siblings. Only siblings this module made and no running write
    holds are touched, and none that is, holds or lies in a folder of ``reads``."""
    reads = [Path(p).resolve() for p in reads]

    def read_by_this_run(path: Path) -> bool:
        return any(path == r or path in r.parents or r in path.parents for r in reads)

    leftovers = []
    for kind in ("old", "tmp"):
        prefix = f".{out.name}.{kind}-"
        found = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
        leftovers += sorted((p for p in found if _is_ours(p, out, kind)),
                            key=lambda p: p.stat().st_mtime, reverse=True)
    for leftover in leftovers:
        if read_by_this_run(leftover.resolve()):
            log(f"kept {leftover.name}, left by an interrupted write of {out.name}, because "
                "this run reads it: move it elsewhere to keep it")
            continue
        lock = _lock(leftover)
        if lock is None:
            continue  # a write still running, or already gone
        try:
            displaced = leftover / out.name
            if leftover.name.startswith(f".{out.name}.old-") and not out.exists() \
                    and displaced.is_dir():
                os.replace(displaced, out)
                log(f"restored {out} from {leftover.name} (an interrupted replacement)")
                leftover.rmdir()
                continue
            _remove(leftover)
            log(f"removed {leftover.name}, left by an interrupted write of {out.name}")
        finally:
            _unlock(lock)


def _set_default_modes(folder: Path) -> None:
    """The temporary folder (0o700) and entries some writers create are owner-only: give them
    the usual umask modes."""
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
        _remove(tmp)  # the old folder, now at the temporary path
    else:
        old, lock = _new_sibling(out, "old")
        try:
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            _remove(old)
        finally:
            _unlock(lock)


@contextmanager
def atomic_dir(
    out_dir: str | os.PathLike, force: bool, log: Callable[[str], None] = print,
    reads: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out_dir``; on success it becomes ``out_dir``.

    On an exception the temporary folder is removed and ``out_dir`` is left as it was. An
    existing ``out_dir`` is replaced only with ``force``, and only once the new one is complete.
    ``reads``: the folders this run reads, which ``recover`` must keep.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out, log, reads)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    tmp, lock = _new_sibling(out, "tmp")
    try:
        yield tmp
        _set_default_modes(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)

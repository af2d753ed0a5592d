"""Atomic folder output (rat_plugin/atomic.py) under a kill at every step: a child process
writes a folder and dies with os._exit (no cleanup runs) just before its k-th file-system
operation, for every k. The output path must then hold the old or the new complete folder,
and the next write's ``recover`` must leave no hidden sibling behind and say what it did."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rat_plugin.atomic import atomic_dir, recover

REPO = Path(__file__).resolve().parents[1]
FILES = ("a", "b")

# Writes {FILES} = "new" into OUT with force, dying just before operation KILL_AT (0: never).
CHILD = r"""
import os, shutil, sys, tempfile
from pathlib import Path
import rat_plugin.atomic as atomic

out, kill_at, can_exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
calls = 0

def dies_before(operation):
    def step(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os._exit(9)
        return operation(*args, **kwargs)
    return step

atomic.exchange = dies_before(atomic.exchange if can_exchange else lambda a, b: False)
os.replace, os.chmod = dies_before(os.replace), dies_before(os.chmod)
shutil.rmtree, tempfile.mkdtemp = dies_before(shutil.rmtree), dies_before(tempfile.mkdtemp)
write = dies_before(Path.write_text)
with atomic.atomic_dir(out, force=True, log=lambda _: None) as tmp:
    for name in sys.argv[4:]:
        write(tmp / name, "new")
print(calls)
"""


def write_in_child(out: Path, kill_at: int, can_exchange: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(kill_at), str(int(can_exchange)), *FILES],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
    )


def contents(out: Path) -> str | None:
    """"old" or "new" when ``out`` is that complete folder, None when missing."""
    if not out.exists():
        return None
    files = {p.name: p.read_text() for p in out.iterdir()}
    assert set(files) == set(FILES) and len(set(files.values())) == 1, files
    return files[FILES[0]]


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "existing, can_exchange",
    [(False, True), (True, True), (True, False)],
    ids=["first-write", "replace-by-exchange", "replace-by-two-renames"],
)
def test_a_kill_at_any_step_leaves_a_complete_folder(tmp_path, existing, can_exchange):
    def fresh_case(k: int) -> Path:
        out = tmp_path / f"kill-{k}" / "model"
        out.mkdir(parents=True)
        if existing:
            for name in FILES:
                (out / name).write_text("old")
        else:
            out.rmdir()
        return out

    finished = write_in_child(fresh_case(0), 0, can_exchange)
    assert finished.returncode == 0, finished.stderr
    operations = int(finished.stdout)
    assert contents(tmp_path / "kill-0" / "model") == "new"
    assert operations >= 4

    for k in range(1, operations + 1):
        out = fresh_case(k)
        assert write_in_child(out, k, can_exchange).returncode == 9
        before = contents(out)
        # Atomic exchange leaves no instant without a complete folder; two renames have one
        # window, closed by recover.
        if existing and can_exchange:
            assert before in ("old", "new"), k
        reports = []
        recover(out, reports.append)
        after = contents(out)
        assert after in (("old", "new") if existing else (None, "new")), (k, after)
        assert before is None or after == before
        assert hidden(out.parent) == [], (k, hidden(out.parent))
        left = [r for r in reports if "removed" in r or "restored" in r]
        assert len(left) == len(reports) and (reports or before == after), reports


def test_the_next_write_recovers_and_reports(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a").write_text("old")
    displaced = tmp_path / ".model.old-x1" / "model"
    os.replace(out, displaced.parent.mkdir() or displaced)  # killed between the two renames
    (tmp_path / ".model.tmp-x2").mkdir()
    reports = []
    with pytest.raises(FileExistsError, match="already exists: pass --force"):
        with atomic_dir(out, force=False, log=reports.append):
            pass
    assert (out / "a").read_text() == "old" and hidden(tmp_path) == []
    assert reports == [
        f"restored {out} from .model.old-x1 (an interrupted replacement)",
        "removed .model.tmp-x2, left by an interrupted write of model",
    ]

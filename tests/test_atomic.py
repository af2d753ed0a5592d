"""Atomic folder output (rat_plugin/atomic.py) under a kill at every step: a child process
writes a folder and dies with os._exit (no cleanup runs) just before its k-th file-system
operation, for every k. The output path must then hold the old or the new complete folder,
and the next write's ``recover`` must leave no hidden sibling behind and say what it did.
What ``recover`` must never touch: siblings named alike that no write of ours made, the
siblings of a write still running, and the folders the run reads."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from killed import hidden, killed
from rat_plugin.atomic import atomic_dir, recover

REPO = Path(__file__).resolve().parents[1]
FILES = ("a", "b")

# Writes {FILES} = "new" into OUT with force, dying just before operation KILL_AT (0: never).
CHILD = r"""
import os, shutil, sys
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
shutil.rmtree, os.mkdir = dies_before(shutil.rmtree), dies_before(os.mkdir)
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


# Writes files named by argv[2:] (content "new") into the folder argv[1], replacing it.
WRITER = """
import sys
from pathlib import Path
from rat_plugin.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1]), force=True, log=lambda _: None) as tmp:
    for name in sys.argv[2:]:
        (tmp / name).write_text("new")
"""


@pytest.fixture
def writer(tmp_path) -> Path:
    path = tmp_path / "writer.py"
    path.write_text(WRITER)
    return path


def old_folder(out: Path) -> Path:
    out.mkdir(parents=True)
    (out / "a").write_text("old")
    return out


def test_the_next_write_recovers_and_reports(tmp_path, writer):
    out = old_folder(tmp_path / "parent" / "model")
    killed("displaced", writer, out, "a")  # the old folder aside, the new one beside it
    assert not out.exists() and len(hidden(out.parent)) == 2
    reports = []
    with pytest.raises(FileExistsError, match="already exists: pass --force"):
        with atomic_dir(out, force=False, log=reports.append):
            pass
    assert (out / "a").read_text() == "old" and hidden(out.parent) == []
    assert len(reports) == 2, reports
    assert re.fullmatch(rf"restored {out} from \.model\.old-\w+-\w+ \(an interrupted "
                        r"replacement\)", reports[0])
    assert re.fullmatch(r"removed \.model\.tmp-\w+-\w+, left by an interrupted write of model",
                        reports[1])


def test_siblings_named_alike_that_no_write_of_ours_made_survive(tmp_path, writer):
    """Another tool's or a person's ``.model.tmp-*`` / ``.model.old-*`` folders (one holding a
    "model" folder while the path is empty) are neither deleted nor moved into place; a real
    leftover of a killed write beside them is still removed."""
    out = tmp_path / "model"
    foreign = {".model.tmp-x": "theirs", ".model.tmp-0123456789abcdef-0123456789abcdef": "theirs",
               ".model.old-x/model": "theirs"}
    for name, text in foreign.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "data").write_text(text)
    killed("swap", writer, out, "a")
    (ours,) = set(hidden(tmp_path)) - {".model.tmp-x", ".model.old-x",
                                       ".model.tmp-0123456789abcdef-0123456789abcdef"}
    reports = []
    with atomic_dir(out, force=False, log=reports.append) as tmp:
        (tmp / "a").write_text("new")
    assert reports == [f"removed {ours}, left by an interrupted write of model"]
    assert {n: (tmp_path / n / "data").read_text() for n in foreign} == foreign
    assert (out / "a").read_text() == "new"


def test_a_running_write_keeps_its_siblings(tmp_path):
    """A second write (or recover) of the same path while one runs leaves the first one's
    temporary folder alone: the first finishes."""
    out = tmp_path / "model"
    reports = []
    with atomic_dir(out, force=False, log=reports.append) as tmp:
        (tmp / "a").write_text("first")
        recover(out, reports.append)
        assert (tmp / "a").read_text() == "first"
    assert (out / "a").read_text() == "first" and reports == [] and hidden(tmp_path) == []


def test_a_leftover_the_run_reads_is_kept(tmp_path, writer):
    out = tmp_path / "model"
    killed("swap", writer, out, "a")
    (leftover,) = (tmp_path / name for name in hidden(tmp_path))
    for reads in ([leftover], [leftover / "a"], [tmp_path]):  # it, a file in it, a folder above
        reports = []
        recover(out, reports.append, reads=reads)
        assert (leftover / "a").read_text() == "new"
        assert reports == [f"kept {leftover.name}, left by an interrupted write of model, "
                           "because this run reads it: move it elsewhere to keep it"]
    recover(out, reports.append)
    assert hidden(tmp_path) == []

"""What every stage shares: its spec in, its result out, rewritten whole after each record.

A stage runs as ``python3 -m gpu_check_stages.<name> --spec SPEC --result RESULT`` (the runner
puts tools/, the repo root and the wheel target on PYTHONPATH). SPEC holds the plan's items;
RESULT is rewritten atomically after every record, so when the runner kills the stage at its
budget the records measured until then are in the report. Torch-free: the runner imports it.
"""

import argparse
import ctypes
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` of a child process: on Linux it gets SIGKILL when its parent dies, so a
    stage (and the trainer a stage starts) never outlives a runner killed with SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a sibling temporary file and one rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def one_line(error: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def shell(command: list[str], env: dict | None = None) -> str:
    """A command as one copyable shell line (environment assignments first)."""
    prefix = [f"{key}={shlex.quote(str(value))}" for key, value in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(str(a)) for a in command])


class Recorder:
    """The stage's result file: status, items (each with its command and records), tables,
    notes and stage-specific results."""

    def __init__(self, path: Path):
        self.path = path
        self.data = dict(status=None, reason=None, items=[], tables=[], notes=[], results={})
        self.tables: Callable[[list[dict]], list[dict]] | None = None
        self.save()

    def save(self) -> None:
        if self.tables is not None:
            self.data["tables"] = self.tables(self.data["items"])
        write_atomic(self.path, json.dumps(self.data, indent=1, default=str) + "\n")

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def record(self, record: dict) -> None:
        """Add a record to the running item and save."""
        self.data["items"][-1]["records"].append(record)
        self.save()

    def run_items(self, items: list[dict], measure: Callable[[dict], Iterable[dict]]) -> None:
        """Run each planned item through ``measure`` (which yields its records, or hands them
        to ``record`` itself), saving after every record; an item that raises is recorded as
        failed and the next one runs."""
        for item in items:
            entry = dict(what=item["what"], command=shell(item["command"]), params=item["params"],
                         status="running", error=None, seconds=None, records=[])
            self.data["items"].append(entry)
            self.save()
            start = time.monotonic()
            try:
                for record in measure(item):
                    self.record(record)
                entry["status"] = "ok"
            except Exception as error:  # one item's failure is its record, not the stage's end
                entry.update(status="failed", error=one_line(error))
            entry["seconds"] = round(time.monotonic() - start, 2)
            self.save()

    def finish(self, reason: str | None = None) -> int:
        """Status from the items (failed when any failed, or with ``reason``); exit code."""
        failed = [i["what"] for i in self.data["items"] if i["status"] == "failed"]
        if failed and reason is None:
            reason = f"{len(failed)} of {len(self.data['items'])} items failed: " + "; ".join(
                f"{i['what']}: {i['error']}" for i in self.data["items"] if i["error"])
        self.data.update(status="failed" if reason else "ok", reason=reason)
        self.save()
        return 1 if reason else 0


def main(body: Callable[[dict, Recorder], str | None]) -> None:
    """Entry point of a stage module: ``body(spec, recorder)`` returns a failure reason or
    None; an exception fails the stage with its one line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    opts = parser.parse_args()
    spec = json.loads(opts.spec.read_text())
    recorder = Recorder(opts.result)
    try:
        reason = body(spec, recorder)
    except Exception as error:
        recorder.finish(one_line(error))
        print(f"stage failed: {one_line(error)}", file=sys.stderr)
        raise
    sys.exit(recorder.finish(reason))

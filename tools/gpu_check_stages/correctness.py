"""Stage 2, correctness: the tests that CPU CI skips, on the GPU, pass / fail / skip per test.

The test files are those of tests/ that ask ``torch.cuda.is_available()``; the plugin
``gpu_check_stages.cuda_tests`` keeps their CUDA tests (Triton kernels, compiled flex below and
above 128 tokens, opcheck, CUDA graphs, the decode step, bf16 mixing against the portable
path). pytest runs in this process (its xdist workers, when installed, as children), so each
outcome reaches the result file as it arrives; the JUnit XML goes to the report folder.
"""

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_check_stages._stage import Recorder, main

REPO = Path(__file__).resolve().parents[2]
OUTCOMES = ("passed", "failed", "error", "skipped")


def _message(report) -> str | None:
    """Why a test skipped or failed, in one line."""
    if report.passed:
        return None
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    lines = [line for line in report.longreprtext.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    text = (errors or lines or [""])[0]
    return text[:500]


class Outcomes:
    """Each test's outcome (passed, failed, skipped, error), duration and message, handed to
    ``on_test`` when its last phase is reported; ``collected``: the selected tests' ids."""

    def __init__(self, on_test: Callable[[dict], None]):
        self.on_test = on_test
        self.pending: dict[str, dict] = {}
        self.collected: list[str] = []

    def pytest_collection_finish(self, session) -> None:
        self.collected = self.collected or [item.nodeid for item in session.items]

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self.collected = self.collected or list(ids)  # every worker collects the same

    def pytest_runtest_logreport(self, report) -> None:
        test = self.pending.setdefault(report.nodeid, dict(id=report.nodeid, outcome="passed",
                                                           seconds=0.0, message=None))
        test["seconds"] = round(test["seconds"] + report.duration, 3)
        if report.failed:
            test["outcome"] = "failed" if report.when == "call" else "error"
            test["message"] = _message(report)
        elif report.skipped and test["outcome"] == "passed":
            test["outcome"], test["message"] = "skipped", _message(report)
        if report.when == "teardown":
            self.on_test(self.pending.pop(report.nodeid))


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "torch.cuda.is_available()" in p.read_text())


def command(planned: list[str], junit: Path) -> list[str]:
    """The planned pytest command with the test files and the JUnit path; without pytest-xdist
    installed, one process."""
    argv = list(planned)
    if "-n" in argv and importlib.util.find_spec("xdist") is None:
        at = argv.index("-n")
        del argv[at:at + 2]
    return argv + cuda_test_files() + [f"--junitxml={junit}"]


def tables(items: list[dict], collected: list[str]) -> list[dict]:
    tests = [record for item in items for record in item["records"]]
    counts = {o: sum(t["outcome"] == o for t in tests) for o in OUTCOMES}
    counts["not run"] = len(set(collected) - {t["id"] for t in tests})
    rows = [f"| `{t['id']}` | {t['outcome']} | {t['seconds']:.1f} | "
            f"{(t['message'] or '').replace('|', '/')} |" for t in tests]
    summary = ", ".join(f"{n} {o}" for o, n in counts.items())
    return [dict(title=f"CUDA tests: {summary}", counts=counts, markdown="\n".join(
        ["| test | outcome | s | message |", "|---|---|---|---|", *rows]))]


def run(spec: dict, recorder: Recorder) -> str | None:
    from rat_plugin.data.prepare import prepare

    (item,) = spec["items"]
    item = dict(item, command=command(item["command"], Path(spec["out"]) / "correctness.xml"))
    outcomes = Outcomes(recorder.record)
    recorder.tables = lambda items: tables(items, outcomes.collected)
    os.chdir(REPO)
    prepare(REPO / "assets")  # once, before pytest-xdist's workers would each write it
    if "-n" in item["command"]:  # inductor's compile workers shared by pytest's
        workers = int(item["command"][item["command"].index("-n") + 1])
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS",
                              str(max(1, (os.cpu_count() or 1) // workers)))

    def measure(item):
        code = pytest.main(item["command"][3:], plugins=[outcomes])
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            raise RuntimeError(f"pytest exited with {code!r}")
        return []  # the outcomes were recorded as they came

    recorder.run_items([item], measure)
    (counts,) = [t["counts"] for t in recorder.data["tables"]]
    recorder.data["results"].update(counts=counts, collected=outcomes.collected)
    broken = [r["id"] for r in recorder.data["items"][0]["records"]
              if r["outcome"] in ("failed", "error")]
    if broken:
        return f"{len(broken)} CUDA tests failed: " + ", ".join(broken[:10])
    if not recorder.data["items"][0]["records"]:
        return "no CUDA test ran or was collected"
    return None


if __name__ == "__main__":
    main(run)

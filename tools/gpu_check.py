"""The GPU check: one offline command on a bare GPU node that returns every figure in 9 minutes.

    make gpu-check [OUT=DIR] [DRY=1]      # or, where make is missing:
    python3 tools/gpu_check.py [--out DIR] [--dry]
    python3 tools/gpu_check.py --plan --gpu h100   # what runs, estimated seconds, budgets

Installs the wheel folder carried with the repository (``make gpu-wheels``, tools/gpu_wheels.py)
into a temporary target, never touching the node's torch, then runs the stages of STAGES in
order, each in its own process (its own session, so a kill reaches its children) with its own
budget from the plan (tools/gpu_check_plan.py), killed at it. Time a stage leaves unused goes
to the next ones; the whole run ends within the plan's total. Every stage has the repo root,
tools/ and the wheel target on PYTHONPATH and one inductor / Triton cache folder. The report
(tools/gpu_check_report.py) is rewritten after every record, so a killed stage or a killed run
still says which stage was cut and why. ``--dry`` runs every stage on CPU at toy size.
docs/gpu_fast_path.md says how to carry the wheels and what each stage measures.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STARTED = time.monotonic()  # a command line's 540 s count from here (the plan's imports too)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the node has no rat_plugin installed: the plan reads its models
    sys.path.insert(1, str(REPO))

from gpu_check_plan import (  # noqa: E402
    LIMIT_S, PROFILES, RESERVE_S, STAGES as STAGE_NAMES, describe, make_plan)
from gpu_check_report import Report  # noqa: E402
from gpu_check_stages._stage import die_with_parent, write_atomic  # noqa: E402

TOOLS = REPO / "tools"
DEFAULT_OUT = REPO / "gpu_check_report"
DEFAULT_CACHE = REPO / ".gpu_check_cache"
DEFAULT_WHEELS = REPO / ".whl"
REPORT_FILES = {"gpu_check.json", "gpu_check.md", "gpu_check.log", "correctness.xml"}
LOG_LIMIT = 8 << 20  # bytes of gpu_check.log kept: its first MiB and the rest from the end
KILL_GRACE_S = 5.0
POLL_S = 1.0


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # capabilities (gpu_check_stages/environment.py) it cannot run without

    @property
    def module(self) -> str:
        return f"gpu_check_stages.{self.name}"


FLEX = ("api:BlockMask.from_kv_blocks(seq_lengths)", "api:flex_attention(return_aux=AuxRequest)")
TRITON_OP = ("api:torch.library.triton_op/wrap_triton",)
STAGES = (
    Stage("environment", ()),
    Stage("correctness", ("gpu", "package:pytest", "rat_plugin.ops", *FLEX, *TRITON_OP,
                          "api:torch.library.custom_op", "api:torch.library.opcheck")),
    Stage("block", ("gpu", "rat_plugin.ops", *FLEX, *TRITON_OP)),
    Stage("generation", ("gpu", "rat_plugin.generate", *FLEX, "api:torch.library.custom_op")),
    Stage("training", ("gpu", "package:torchtitan", "package:torchdata", "package:datasets",
                       "package:tyro", "rat_plugin.train_spec", *FLEX, *TRITON_OP)),
)
assert tuple(s.name for s in STAGES) == STAGE_NAMES


class Stopped(Exception):
    """The run was told to stop (SIGTERM, SIGINT)."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"gpu_check: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="report folder (default: gpu_check_report/ in the repo)")
    parser.add_argument("--dry", action="store_true",
                        help="every stage on CPU at toy size (what CI runs)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--gpu", choices=["auto", "h100", "h200"], default="auto",
                        help="the plan's GPU (auto: from nvidia-smi, else h100)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help=f"run only these of {', '.join(STAGE_NAMES)}")
    parser.add_argument("--stage-budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="kill STAGE after SECONDS, its plan unchanged (repeatable; tests "
                             "the cut-off)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's budget (the plan fits what it can)")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS,
                        help="the carried wheel folder (default .whl/; absent: nothing installed)")
    parser.add_argument("--cache-dir", type=Path,
                        help="inductor / Triton cache (default .gpu_check_cache/; dry: temporary)")
    opts = parser.parse_args(argv)
    for name in opts.stages or ():
        if name not in STAGE_NAMES:
            parser.error(f"--stages {name!r} is not a stage: choose from {', '.join(STAGE_NAMES)}")
    opts.budgets = {}
    for entry in opts.stage_budget:
        name, _, seconds = entry.partition("=")
        if name not in STAGE_NAMES:
            parser.error(f"--stage-budget {entry!r}: {name!r} is not a stage: choose from "
                         f"{', '.join(STAGE_NAMES)}")
        try:
            opts.budgets[name] = float(seconds)
        except ValueError:
            opts.budgets[name] = -1.0
        if not opts.budgets[name] > 0:
            parser.error(f"--stage-budget {entry!r}: give STAGE=SECONDS with SECONDS > 0")
    if not opts.budget_scale > 0:
        parser.error(f"--budget-scale {opts.budget_scale}: must be > 0")
    opts.wheels = opts.wheels.resolve()  # the stages run in other folders
    if opts.wheels != DEFAULT_WHEELS and not opts.wheels.is_dir():
        parser.error(f"--wheels {opts.wheels} is not a folder: run `make gpu-wheels` on a "
                     "connected machine and copy .whl/ with the repo")
    return opts


def check_out(out: Path) -> Path:
    """The report folder, created; refused (one line) when it is a file or holds other files
    (the report keeps to at most 8 files of its own)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"gpu_check: --out {out} is a file: give a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"gpu_check: --out {out} cannot be created ({error.strerror}): "
                         "give a writable folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
    if others:
        raise SystemExit(f"gpu_check: --out {out} holds other files ({', '.join(others[:5])}): "
                         "give an empty folder or a previous report's")
    return out.resolve()


def detect_gpu() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "h100"
    return "h200" if "H200" in name else "h100"


def read_warm(cache: Path) -> list[str]:
    """Stages that completed once with this cache folder (their compiles are cached)."""
    try:
        return json.loads((cache / "warm.json").read_text())
    except (OSError, ValueError):
        return []


def missing(stage: Stage, environment: dict, dry: bool) -> str | None:
    """Why ``stage`` cannot run on this node (from stage 1's capabilities), or None."""
    capabilities = environment.get("capabilities")
    if capabilities is None:
        return None  # stage 1 did not finish: try, and let the stage say what fails
    for need in stage.needs:
        if need == "gpu" and dry:
            continue
        if capabilities.get(need):
            return f"{need}: {capabilities[need]}"
    return None


def stage_env(target: Path, cache: Path, dry: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"))
    paths = [str(REPO), str(TOOLS), str(target)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU run, on any machine
    return env


def kill(proc: subprocess.Popen) -> None:
    """End a stage and every process of its session: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def trim_log(log: Path) -> None:
    size = log.stat().st_size
    if size <= LOG_LIMIT:
        return
    with log.open("rb") as f:
        head = f.read(1 << 20)
        f.seek(size - (LOG_LIMIT - (1 << 20)))
        tail = f.read()
    cut = f"\n[... {size - len(head) - len(tail):,} bytes of log cut ...]\n".encode()
    log.write_bytes(head + cut + tail)


class Runner:
    """One run of the plan's stages into one report."""

    def __init__(self, opts, plan, out: Path, cache: Path, work: Path):
        self.opts, self.plan, self.out, self.work = opts, plan, out, work
        self.target = work / "wheels_target"
        self.target.mkdir()
        self.env = stage_env(self.target, cache, plan.dry)
        self.cache = cache
        self.log = out / "gpu_check.log"
        self.log.write_text("")
        command = "python3 tools/gpu_check.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if opts.argv is None else opts.argv))
        self.report = Report(out, plan.to_dict(), command.strip(), plan.dry)
        self.proc: subprocess.Popen | None = None
        self.current: tuple[str, Path] | None = None  # the running stage and its result file

    def run(self, started: float) -> int:
        total = min(LIMIT_S, self.plan.total_budget_s + RESERVE_S)
        deadline = started + total - 2 * KILL_GRACE_S - 2  # a kill and the last report write
        left = 0.0  # budget earlier stages did not use
        try:
            for stage in STAGES:
                left = self.run_stage(stage, left, deadline)
        except Stopped as stop:
            if self.current is not None:
                self.take_result(*self.current, None)  # what it measured before the stop
            for stage in self.report.data["stages"]:
                if stage["status"] in ("pending", "running"):
                    status = "timeout" if stage["status"] == "running" else "skipped"
                    self.report.update(stage["name"], status=status, reason=str(stop))
            self.report.finish("stopped")
            return 1
        self.report.finish("complete")
        bad = [s for s in self.report.data["stages"] if s["status"] != "ok"
               and not (s["reason"] or "").startswith("not selected")]
        return 1 if bad else 0

    def run_stage(self, stage: Stage, left: float, deadline: float) -> float:
        """Run or skip ``stage``; returns the budget left for the next stages."""
        planned = self.plan.stage(stage.name).budget_s
        reason = missing(stage, self.report.data["environment"], self.plan.dry)
        if self.opts.stages and stage.name not in self.opts.stages:
            reason = "not selected (--stages)"
        fixed = self.opts.budgets.get(stage.name)  # --stage-budget: exactly that
        allowed = min(fixed or planned + left, deadline - time.monotonic())
        if reason is None and allowed < 1:
            reason = "no time left of the run's budget"
        if reason is not None:
            self.report.update(stage.name, status="skipped", reason=reason)
            return left + planned
        duration = self.execute(stage, allowed, planned)
        return max(0.0, left + planned - duration)

    def execute(self, stage: Stage, allowed: float, planned: float) -> float:
        spec, result = self.work / f"{stage.name}.spec.json", self.work / f"{stage.name}.json"
        items = [asdict(item) for item in self.plan.stage(stage.name).items]
        spec.write_text(json.dumps(dict(stage=stage.name, dry=self.plan.dry, items=items,
                                        out=str(self.out), work=str(self.work),
                                        wheels=str(self.opts.wheels), target=str(self.target))))
        command = [sys.executable, "-m", stage.module, "--spec", str(spec),
                   "--result", str(result)]
        self.report.update(stage.name, status="running", started=time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), allowed_s=round(allowed, 1))
        start, seen, timed_out = time.monotonic(), None, False
        self.current = (stage.name, result)
        with self.log.open("a") as log:
            log.write(f"\n===== stage {stage.name} (budget {allowed:.0f} s): "
                      f"{shlex.join(command)}\n")
            log.flush()
            self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
            while self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    pass
                seen = self.take_result(stage.name, result, seen)
                if self.proc.poll() is None and time.monotonic() - start > allowed:
                    timed_out = True
                    kill(self.proc)
        duration = time.monotonic() - start
        self.take_result(stage.name, result, None)
        self.finish_stage(stage.name, self.proc.returncode, timed_out, duration, allowed,
                          planned, result)
        self.proc = self.current = None
        trim_log(self.log)
        return duration

    def take_result(self, name: str, result: Path, seen) -> object:
        """Merge the stage's result file into the report when it changed."""
        try:
            stamp = result.stat().st_mtime_ns
            if stamp != seen:
                self.report.take_result(name, json.loads(result.read_text()))
            return stamp
        except (OSError, ValueError):
            return seen

    def finish_stage(self, name, code, timed_out, duration, allowed, planned, result) -> None:
        try:
            outcome = json.loads(result.read_text())
        except (OSError, ValueError):
            outcome = {}
        estimate = self.plan.stage(name).estimate_s
        if timed_out:
            status = "timeout"
            reason = (f"cut at its budget of {allowed:.0f} s (planned {planned:.0f} s, estimate "
                      f"{estimate:.0f} s): the records measured until then are kept")
        elif code == 0:
            status, reason = outcome.get("status") or "ok", outcome.get("reason")
        else:
            status = "failed"
            reason = outcome.get("reason") or f"the stage exited with {code}: {self.last_line()}"
        self.report.update(name, status=status, reason=reason, duration_s=round(duration, 1))
        if name == "environment" and self.report.data["environment"]:
            self.report.data["environment"]["runnable"] = {
                s.name: missing(s, self.report.data["environment"], self.plan.dry)
                for s in STAGES[1:]}
            self.report.write()
        if status == "ok" and not self.plan.dry and name != "environment":  # it compiled
            warm = sorted(set(read_warm(self.cache)) | {name})
            write_atomic(self.cache / "warm.json", json.dumps(warm) + "\n")

    def last_line(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines()[-50:]
                 if line.strip()]
        return lines[-1][-300:] if lines else ""

    def stop(self, signum, frame) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill(self.proc)
        raise Stopped(f"the check was stopped ({signal.Signals(signum).name}) while this stage "
                      "ran or before it")


def main(argv=None) -> int:
    started = STARTED if argv is None else time.monotonic()  # the process, or this call
    opts = parse_args(argv)
    opts.argv = argv
    profile = PROFILES["cpu" if opts.dry else (detect_gpu() if opts.gpu == "auto" else opts.gpu)]
    cache = opts.cache_dir or DEFAULT_CACHE
    warm = [] if opts.dry and opts.cache_dir is None else read_warm(cache)
    plan = make_plan(profile, opts.budget_scale, warm)
    if opts.plan:
        print(describe(plan))
        return 0
    out = check_out(opts.out)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        if opts.dry and opts.cache_dir is None:
            cache = Path(work) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        runner = Runner(opts, plan, out, cache, Path(work))
        handlers = {sig: signal.signal(sig, runner.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = runner.run(started)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    print(f"gpu_check: {runner.report.data['state']}; report in {out}/gpu_check.md and "
          f"gpu_check.json")
    return code


if __name__ == "__main__":
    sys.exit(main())

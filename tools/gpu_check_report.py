"""The GPU check's report: gpu_check.json (versioned schema) and gpu_check.md, rewritten
atomically whenever anything changes, so a killed stage or a killed run leaves a report.

gpu_check.json (schema ``rat-titan.gpu_check``, version 1):
- ``state``: running | complete | stopped; ``started`` / ``finished`` (UTC ISO), ``command``,
  ``dry``, ``gpu`` (the node's GPU name, or the profile's before stage 1 has run);
- ``environment``: stage 1's results (GPU, versions, packages, torch APIs, wheels,
  capabilities) and ``runnable``: stage -> null or why it cannot run;
- ``plan``: gpu_check_plan.Plan.to_dict() (per stage: items with estimates, cuts, budget);
- ``stages``: per stage ``status`` (pending | running | ok | failed | skipped | timeout),
  ``reason``, ``budget_s`` (planned), ``allowed_s`` (with time left by earlier stages),
  ``estimate_s``, ``started``, ``duration_s``, ``items`` (each measured figure group: ``what``,
  the exact ``command``, ``status``, ``error``, ``seconds``, ``records``), ``tables``
  (Markdown), ``notes``, ``results`` (stage-specific summary) and the plan's ``cut``.
"""

import json
import time
from pathlib import Path

from gpu_check_stages._stage import write_atomic

SCHEMA, VERSION = "rat-titan.gpu_check", 1
STATUSES = ("pending", "running", "ok", "failed", "skipped", "timeout")
MESSAGE_LIMIT = 2000


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Report:
    def __init__(self, out: Path, plan: dict, command: str, dry: bool):
        self.out = out
        stages = [dict(name=s["name"], status="pending", reason=None, budget_s=s["budget_s"],
                       allowed_s=None, estimate_s=s["estimate_s"], started=None,
                       duration_s=None, items=[], tables=[], notes=[], results={}, cut=s["cut"])
                  for s in plan["stages"]]
        self.data = dict(schema=SCHEMA, version=VERSION, state="running", started=now(),
                         finished=None, command=command, dry=dry, gpu=plan["gpu"],
                         environment={}, plan=plan, stages=stages)
        self.write()

    def stage(self, name: str) -> dict:
        return next(s for s in self.data["stages"] if s["name"] == name)

    def update(self, name: str, **fields) -> None:
        self.stage(name).update(fields)
        self.write()

    def take_result(self, name: str, result: dict) -> None:
        """A stage's result file as it stands (items, tables, notes, results)."""
        self.stage(name).update({k: result[k] for k in ("items", "tables", "notes", "results")})
        if name == "environment":
            self.data["environment"] = result["results"]
            gpu = result["results"].get("gpu", {})
            if gpu.get("available"):
                self.data["gpu"] = gpu["name"]
        self.write()

    def finish(self, state: str) -> None:
        self.data.update(state=state, finished=now())
        self.write()

    def write(self) -> None:
        write_atomic(self.out / "gpu_check.json", json.dumps(self.data, indent=1) + "\n")
        write_atomic(self.out / "gpu_check.md", markdown(self.data))


# -- Markdown ------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _measured_on(data: dict) -> str:
    versions = data["environment"].get("versions", {})
    return (f"Measured {data['started'][:10]} on {data['gpu']}, torch {versions.get('torch', '?')}"
            f", triton {versions.get('triton', '?')}, CUDA {versions.get('cuda', '?')}"
            f"{' (DRY RUN on CPU: toy sizes, not GPU figures)' if data['dry'] else ''}.")


def environment_section(env: dict) -> list[str]:
    if not env:
        return ["(stage 1 has not reported yet)"]
    gpu, versions = env.get("gpu", {}), env.get("versions", {})
    lines = [_table(["GPU", "memory GiB", "driver", "torch", "triton", "CUDA", "Python", "cores"],
                    [[gpu.get("name", "none"), gpu.get("memory_gib", "-"), gpu.get("driver", "-"),
                      versions.get("torch"), versions.get("triton"), versions.get("cuda"),
                      versions.get("python"), versions.get("cpu_cores")]])]
    wheels = env.get("wheels", {})
    installed = "installed " + (", ".join(wheels.get("installed", [])) or "none")
    lines.append(f"\nWheels: {wheels.get('error') or wheels.get('skipped') or installed}")
    packages = env.get("packages", {})
    lines.append("Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    missing = {k: v for k, v in env.get("torch_apis", {}).items() if v}
    lines.append("Torch APIs of the GPU program: " + (
        "all present" if not missing else "missing " + "; ".join(missing)))
    runnable = env.get("runnable", {})
    if runnable:
        lines.append("Stages: " + "; ".join(f"{k} {'can run' if v is None else 'cannot: ' + v}"
                                            for k, v in runnable.items()))
    return lines


def stage_section(stage: dict, planned: dict, measured_on: str) -> list[str]:
    lines = [f"## {stage['name']}: {stage['status']}"]
    if stage["name"] == "environment" and stage["results"]:
        lines.append("\nWhat it found is the Environment section above.")
    if stage["reason"]:
        lines.append(f"\n{stage['reason'][:MESSAGE_LIMIT]}")
    for table in stage["tables"]:
        lines += [f"\n### {table['title']}", "", measured_on]
        if table.get("setup"):
            lines.append(f"Setup: {table['setup']}")
        lines += ["", table["markdown"]]
    if stage["items"]:
        lines.append("\nCommands (each figure's exact command):\n")
        for item in stage["items"]:
            error = f" -- {item['error']}" if item.get("error") else ""
            seconds = "" if item["seconds"] is None else f", {item['seconds']:.0f} s"
            lines.append(f"- {item['what']} ({item['status']}{seconds}{error}): "
                         f"`{item['command']}`")
    ran = {item["what"] for item in stage["items"]}
    if stage["status"] not in ("pending", "running", "skipped"):
        lines += [f"- not run: {item['what']} (planned, {item['estimate_s']:.0f} s; the stage "
                  "ended before it)" for item in planned["items"] if item["what"] not in ran]
    for cut in stage["cut"]:
        lines.append(f"- cut: {cut['what']}: {cut['reason']}")
    lines += [f"- note: {note}" for note in stage["notes"]]
    return lines


def markdown(data: dict) -> str:
    """The report as Markdown: environment, stage statuses, the plan, each stage's tables with
    the commands of its figures."""
    state = f"**{data['state']}**" + (f", finished {data['finished']}" if data["finished"] else
                                       " (when no check runs any more, it was killed while the "
                                       "stage marked running ran)")
    lines = [f"# GPU check, {data['gpu']}, {data['started']}", "",
             f"State: {state}; command `{data['command']}`; schema {data['schema']} "
             f"v{data['version']}.",
             _measured_on(data), "", "## Environment", ""]
    lines += environment_section(data["environment"])
    plan = data["plan"]
    lines += ["", "## Stages", "",
              f"Plan for {plan['gpu']}: estimate {plan['total_estimate_s']:.0f} s, budgets "
              f"{plan['total_budget_s']:.0f} s (limit {plan['limit_s']} s with the reserve).", "",
              _table(["stage", "status", "s", "budget s", "estimate s", "why"],
                     [[s["name"], s["status"], _seconds(s["duration_s"]),
                       _seconds(s["allowed_s"] or s["budget_s"]), _seconds(s["estimate_s"]),
                       (s["reason"] or "")[:300]] for s in data["stages"]])]
    measured_on = _measured_on(data)
    for stage, planned in zip(data["stages"], plan["stages"]):
        lines += [""] + stage_section(stage, planned, measured_on)
    return "\n".join(lines) + "\n"

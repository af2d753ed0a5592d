"""Stage 5, the shipped 1.3B recipes through torchtitan's trainer on one GPU.

Each planned item is one trainer process (``python3 -m torchtitan.train`` with the
single-process rendezvous in its environment: no torchrun, so killing this stage's process
group ends it): a shipped config with only what one GPU needs overridden (batch, steps, no
checkpoint or validation) and the generated debug corpus and tokenizer as data (no Llama
tokenizer or FineWeb on the node; ``python -m rat_plugin.data.prepare``). Its log lines are
passed through and parsed: per step loss, tokens/s, TFLOP/s, MFU and peak reserved memory, as
torchtitan's metrics print them; the summary leaves out the first steps (compile, warm-up).
"""

import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _bench_common as bench

from gpu_check_stages._stage import Recorder, die_with_parent, main, shell

REPO = Path(__file__).resolve().parents[2]
STEP = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+grad_norm:\s*(?P<grad_norm>\S+)\s+"
    r"memory:\s*(?P<memory_gib>[\d.]+)GiB\([\d.]+%\)\s+tps:\s*(?P<tps>[\d,]+)\s+"
    r"tflops:\s*(?P<tflops>[\d,.]+)\s+mfu:\s*(?P<mfu>[\d.]+)%")
NOTED = ("RAT kernels:", "Compiling each TransformerBlock", "Applied selective activation",
         "Mixed precision", "Peak FLOPS used for computing MFU")


def single_process_env() -> dict:
    """torch.distributed's env:// rendezvous for one process on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def parse_step(line: str) -> dict | None:
    match = STEP.search(line)
    if match is None:
        return None
    values = {k: float(v.replace(",", "")) for k, v in match.groupdict().items()}
    values["step"] = int(values["step"])
    return values


def measure(item: dict, recorder: Recorder):
    env = single_process_env()
    recorder.data["items"][-1]["command"] = shell(item["command"], env)
    command = [sys.executable if a == "python3" else a for a in item["command"]]
    notes = recorder.data["notes"]
    start = time.monotonic()
    lines = []
    with subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          preexec_fn=die_with_parent) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip())
            del lines[:-40]
            if any(key in line for key in NOTED):
                notes.append(line.split(" - INFO - ", 1)[-1].strip())
            step = parse_step(line)
            if step is not None:
                step["seconds"] = round(time.monotonic() - start, 1)
                yield step
    if proc.returncode != 0:
        last = next((line for line in reversed(lines) if line.strip()), "")
        raise RuntimeError(f"the trainer exited with {proc.returncode}: {last[-300:]}")


def summary(item: dict) -> dict:
    """tokens/s, TFLOP/s and MFU: medians over the steps after the warm-up ones; peak
    memory over all; losses finite."""
    steps = item["records"]
    warm = [s for s in steps if s["step"] > item["params"]["warmup_steps"]]
    losses = [s["loss"] for s in steps]

    def median(key):
        return statistics.median(s[key] for s in warm) if warm else None

    return dict(steps=len(steps), timed_steps=len(warm), tokens_per_s=median("tps"),
                tflops=median("tflops"), mfu_pct=median("mfu"),
                peak_memory_gib=max((s["memory_gib"] for s in steps), default=None),
                first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                loss_finite=bool(losses) and all(math.isfinite(x) for x in losses),
                first_step_after_s=steps[0]["seconds"] if steps else None)


def tables(items: list[dict]) -> list[dict]:
    rows = []
    for item in items:
        s = summary(item)
        fmt = "{:,.0f}".format
        rows.append([item["params"]["kind"], item["params"]["config"], str(s["steps"]),
                     fmt(s["tokens_per_s"]) if s["tokens_per_s"] is not None else "-",
                     f"{s['tflops']:.1f}" if s["tflops"] is not None else "-",
                     f"{s['mfu_pct']:.1f}%" if s["mfu_pct"] is not None else "-",
                     f"{s['peak_memory_gib']:.1f}" if s["peak_memory_gib"] is not None else "-",
                     "-" if s["first_loss"] is None else
                     f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}",
                     "yes" if s["loss_finite"] else "no",
                     "-" if s["first_step_after_s"] is None else f"{s['first_step_after_s']:.0f}",
                     item["status"]])
    headers = ["model", "config", "steps", "tokens/s", "TFLOP/s", "MFU", "peak reserved GiB",
               "loss first -> last", "loss finite", "s to step 1", "run"]
    return [dict(title="Training through torchtitan's trainer, one GPU (medians after the "
                       "warm-up steps)", markdown=bench.markdown_table(headers, rows))]


def run(spec: dict, recorder: Recorder) -> str | None:
    from rat_plugin.data.prepare import prepare

    prepare(REPO / "assets")  # the debug corpus and tokenizer (idempotent)
    recorder.tables = tables
    recorder.run_items(spec["items"], lambda item: measure(item, recorder))
    recorder.data["results"]["summaries"] = {
        i["params"]["kind"]: summary(i) for i in recorder.data["items"]}
    unfinite = [k for k, s in recorder.data["results"]["summaries"].items()
                if s["steps"] and not s["loss_finite"]]
    return f"non-finite loss: {', '.join(unfinite)}" if unfinite else None


if __name__ == "__main__":
    main(run)

"""Shared helpers of the benchmark tools: timing, machine description, JSON / Markdown / PNG."""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rat_plugin.model.cache import RATCache
from rat_plugin.ops.chunk_scan import accumulation_dtype
from rat_plugin.ops.decode_attention import decode_backend


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    max_seconds: float = float("inf"),
    min_seconds: float = 0.0,
    max_repeats: int = 100,
) -> list[float]:
    """Wall times (ms) of calls after ``warmup`` calls: at least ``repeats`` of them, more (up to
    ``max_repeats``) while they total under ``min_seconds`` (cheap calls get a robust median on
    a shared machine), fewer (at least one) once they total over ``max_seconds``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < max_repeats:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        total = sum(times) / 1e3
        if total > max_seconds or (len(times) >= repeats and total >= min_seconds):
            break
    return times


class Stopwatch:
    """Seconds between laps, synchronised with the device."""

    def __init__(self, device: torch.device):
        self.device = device
        sync(device)
        self.last = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: the device by name, core and thread counts, versions."""
    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict) -> str:
    where = info.get("gpu") or f"CPU {info['cpu']} ({info['cpu_cores']} cores)"
    return f"{where}, torch {info['torch']}, {info['torch_threads']} torch threads"


def parse_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return device


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark tool takes: CUDA-graph decoding, threads, output folder."""
    parser.add_argument("--cuda-graph", action="store_true",
                        help="decode by CUDA-graph replays (cuda only)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"))


def parse_run(parser: argparse.ArgumentParser, argv, defaults: dict) -> argparse.Namespace:
    """Parse, fill unset options from ``defaults[device type]``, check --cuda-graph and apply
    --threads."""
    opts = parser.parse_args(argv)
    device = parse_device(opts.device)
    for key, value in defaults[device.type].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return opts


def fill_randomly(cache, position: int, heads: int, head_dim: int) -> None:
    """Fill a new decode cache, whose prompts are all ``position`` tokens, through its own
    ``fill`` with random states: a long position without its quadratic prefill."""
    rat = isinstance(cache, RATCache)
    dtype = accumulation_dtype(cache.dtype) if rat else cache.dtype  # RAT fills from fp32 states
    shape = (cache.lengths.shape[0], position, heads, head_dim)
    device = cache.lengths.device
    cache.fill(torch.randn(shape, device=device, dtype=dtype),
               torch.randn(shape, device=device, dtype=dtype))


def decode_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """What a decode step's attention runs on (rat_plugin.ops.decode_attention)."""
    q = torch.empty(1, 1, head_dim, device=device, dtype=dtype)
    return {"flash": "flash-attn kv-cache", "sdpa": "SDPA"}[decode_backend(q)]


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"--dtype {name!r} is unknown: choose one of {sorted(dtypes)}")
    return dtypes[name]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in [headers, *rows])


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pyplot():
    """matplotlib.pyplot on a file backend, or None (with a message) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plot (pip install 'rat-titan[bench]')")
        return None
    return plt


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}x"

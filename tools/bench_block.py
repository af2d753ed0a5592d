"""Latency of one token-mixing block, RAT against attention, the way the RAT paper times it.

The block is x + Mixer(RMSNorm(x)) built from the model's own classes: RAT at several chunk
sizes L, full causal attention and sliding-window attention, same width and heads. Modes:
``train`` (forward + backward), ``prefill`` (forward filling a decode cache) and ``decode``
(one token per sequence at position P with a filled cache). Training and prefill sweep the
sequence length T at a fixed token budget (batch = budget / T); decode sweeps P at a fixed batch.

    python tools/bench_block.py --device cpu
    python tools/bench_block.py --device cuda   # the paper's shapes: D=2048, H=16, bf16
    python tools/bench_block.py --device cuda --scan-kernel triton_autotune \\
        --attention-kernel flex_bf16   # the unmeasured speed choices, against the default
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from rat_plugin.generate.step import capture_cuda_graph  # noqa: E402
from rat_plugin.model import swa as swa_module  # noqa: E402
from rat_plugin.model.args import RATModelArgs  # noqa: E402
from rat_plugin.model.rat import RAT  # noqa: E402
from rat_plugin.model.swa import SlidingWindowAttention  # noqa: E402
from rat_plugin.ops.dispatch import ATTENTION_KERNELS, SCAN_KERNELS, select_kernels  # noqa: E402

DEFAULTS = {
    # The paper: 262,144 tokens per step, T = 4K..256K, D = 2048, H = 16 (d = 128), bf16.
    "cuda": dict(dim=2048, heads=16, dtype="bf16", tokens=262144,
                 seq_lens=[4096, 8192, 16384, 32768, 65536, 131072, 262144],
                 decode_positions=[4096, 8192, 16384, 32768, 65536, 131072],
                 decode_batch=16, warmup=3, repeats=10),
    # Small enough for a few minutes on 2 cores.
    "cpu": dict(dim=256, heads=4, dtype="fp32", tokens=16384, seq_lens=[4096, 8192, 16384],
                decode_positions=[4096, 8192, 16384, 32768], decode_batch=16, warmup=1,
                repeats=3),
}
MODES = ("train", "prefill", "decode")
MAX_REPEATS = 50


class MixerBlock(nn.Module):
    """x + Mixer(RMSNorm(x)): pre-norm, the mixer's projections, mixing, output, residual."""

    def __init__(self, dim: int, mixer: nn.Module):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.mixer = mixer

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), None, cache)


def mixer_specs(chunk_sizes: list[int], window: int, only: list[str] | None = None
                ) -> list[tuple[str, dict]]:
    """(name, spec) of the mixers timed: attention, SWA, RAT per chunk size (or ``only``)."""
    specs = [("attention", dict(kind="attention", window=None))]
    specs.append((f"swa{window}", dict(kind="attention", window=window)))
    specs += [(f"rat_L{size}", dict(kind="rat", chunk_size=size)) for size in chunk_sizes]
    return [(name, spec) for name, spec in specs if not only or name in only]


def build_block(spec: dict, opts, device, dtype) -> MixerBlock:
    dim, kernels = opts.dim, (opts.scan_kernel, opts.attention_kernel)
    if spec["kind"] == "rat":
        args = RATModelArgs(
            dim=dim, n_layers=1, n_heads=opts.heads, n_groups=opts.groups,
            chunk_size=spec["chunk_size"], vocab_size=2, ffn_hidden_dim=4 * dim,
            scan_kernel=kernels[0], attention_kernel=kernels[1],
        )
        mixer = RAT(args)
    else:
        mixer = SlidingWindowAttention(dim, opts.heads, spec["window"], 10000.0, kernels)
    mixer.init_weights()
    return MixerBlock(dim, mixer).to(device=device, dtype=dtype)


def attention_backend(device: torch.device) -> tuple[str, contextlib.AbstractContextManager]:
    """flash-attn's kernel for training and prefill when importable on CUDA, else PyTorch SDPA.

    Returns a description and a context that routes the model's attention through it.
    """
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            return "PyTorch SDPA (flash-attn not importable)", contextlib.nullcontext()

        def flash_window_attention(q, k, v, window):
            left = -1 if window is None else window  # itself and `window` previous tokens
            out = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                causal=True, window_size=(left, 0),
            )
            return out.transpose(1, 2)

        patch = _patched(swa_module, "window_attention", flash_window_attention)
        return "flash-attn (train, prefill); PyTorch SDPA (decode)", patch
    return "PyTorch SDPA (CPU)", contextlib.nullcontext()


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def train_step(block: MixerBlock, x: torch.Tensor):
    def step():
        for p in block.parameters():
            p.grad = None
        x.grad = None
        block(x).sum().backward()

    return step


def prefill_step(block: MixerBlock, x: torch.Tensor):
    lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)

    def step():
        with torch.inference_mode():
            block(x, block.mixer.new_cache(lengths, x.shape[1]))

    return step


def filled_cache(block: MixerBlock, batch: int, position: int, steps: int, device):
    """A cache holding ``position`` tokens per sequence, filled through the cache's own
    ``fill`` with random states (no quadratic prefill), with room for ``steps`` more."""
    mixer = block.mixer
    cache = mixer.new_cache(torch.full((batch,), position, device=device), position + steps)
    bench.fill_randomly(cache, position, mixer.wv.out_features // mixer.head_dim, mixer.head_dim)
    return cache


def decode_step(block: MixerBlock, cache, batch: int, dim: int, device, dtype, cuda_graph: bool):
    """One decode step of the block; with ``cuda_graph`` a replay of it, captured once. Either
    way each call advances the cache by one token (it has room for every timed call)."""
    token = torch.randn(batch, 1, dim, device=device, dtype=dtype)

    def step():
        with torch.inference_mode():
            block(token, cache)

    if cuda_graph:
        snapshot = cache.snapshot()
        return capture_cuda_graph(step, lambda: cache.restore(snapshot), device)
    return step


def run_case(name, spec, mode, seq_len, opts, device, dtype) -> dict:
    torch.manual_seed(0)
    block = build_block(spec, opts, device, dtype)
    record = dict(mixer=name, mode=mode, seq_len=seq_len)
    try:
        if mode == "decode":
            batch = opts.decode_batch
            steps = opts.warmup + MAX_REPEATS
            cache = filled_cache(block, batch, seq_len, steps, device)
            step = decode_step(block, cache, batch, opts.dim, device, dtype, opts.cuda_graph)
            record["cache_bytes_per_sequence"] = cache.nbytes_per_sequence()
        else:
            batch = max(1, opts.tokens // seq_len)
            x = torch.randn(batch, seq_len, opts.dim, device=device, dtype=dtype)
            if mode == "train":
                x.requires_grad_(True)
                step = train_step(block, x)
            else:
                step = prefill_step(block, x)
        record["batch"] = batch
        times = bench.time_ms(step, device, opts.warmup, opts.repeats, opts.max_case_seconds,
                              opts.min_case_seconds, MAX_REPEATS)
    except torch.OutOfMemoryError:
        record.update(ms=None, error="out of memory")
        torch.cuda.empty_cache()
        return record
    record.update(ms=bench.median(times), times_ms=times)
    return record


def summarize(records: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per (mode, T): ms per mixer, then attention / RAT speedups."""
    rat_names = [n for n in names if n.startswith("rat")]
    headers = ["mode", "T or P", "batch"] + [f"{n} ms" for n in names]
    headers += [f"attn/{n}" for n in rat_names]
    rows = []
    keys = sorted({(r["mode"], r["seq_len"]) for r in records},
                  key=lambda k: (MODES.index(k[0]), k[1]))
    for mode, seq_len in keys:
        ms = {r["mixer"]: r["ms"] for r in records if (r["mode"], r["seq_len"]) == (mode, seq_len)}
        batch = next(r["batch"] for r in records if (r["mode"], r["seq_len"]) == (mode, seq_len))
        row = [mode, str(seq_len), str(batch)] + [bench.fmt_ms(ms.get(n)) for n in names]
        row += [bench.fmt_ratio(ms.get("attention"), ms.get(n)) for n in rat_names]
        rows.append(row)
    return headers, rows


def plot(records: list[dict], names: list[str], modes: list[str], title: str, path: Path) -> bool:
    plt = bench.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in names:
            points = sorted((r["seq_len"], r["ms"]) for r in records
                            if r["mode"] == mode and r["mixer"] == name and r["ms"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("position P" if mode == "decode" else "sequence length T")
        ax.set_ylabel("ms")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dim", type=int, help="model width D (cpu 256, cuda 2048)")
    parser.add_argument("--heads", type=int, help="heads H (cpu 4, cuda 16)")
    parser.add_argument("--groups", type=int, default=2, help="RAT query/key groups G")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--window", type=int, default=1024, help="SWA window")
    parser.add_argument("--mixers", nargs="+",
                        help="time only these (attention, swa<window>, rat_L<chunk size>)")
    parser.add_argument("--scan-kernel", choices=SCAN_KERNELS, default="auto",
                        help="RAT's scan kernel (the model's scan_kernel setting)")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default="auto",
                        help="RAT's summary and SWA's window attention kernel")
    parser.add_argument("--dtype", help="fp32, bf16 or fp16 (cpu fp32, cuda bf16)")
    parser.add_argument("--tokens", type=int, help="tokens per train/prefill step (batch * T)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="train/prefill lengths T")
    parser.add_argument("--decode-positions", type=int, nargs="+", help="decode positions P")
    parser.add_argument("--decode-batch", type=int, help="sequences per decode step")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--max-case-seconds", type=float, default=15.0,
                        help="stop repeating a case once its timed calls took this long")
    parser.add_argument("--min-case-seconds", type=float, default=2.0,
                        help=f"repeat cheap cases (up to {MAX_REPEATS} times) this long")
    bench.add_run_options(parser)
    opts = bench.parse_run(parser, argv, DEFAULTS)
    if opts.dim % opts.heads or (opts.dim // opts.heads) % 2:
        parser.error(f"--dim {opts.dim} must split into --heads {opts.heads} even head dims")
    if opts.heads % opts.groups:
        parser.error(f"--groups {opts.groups} must divide --heads {opts.heads}")
    names = [name for name, _ in mixer_specs(opts.chunk_sizes, opts.window)]
    unknown = sorted(set(opts.mixers or ()) - set(names))
    if unknown:
        parser.error(f"--mixers {' '.join(unknown)}: not among this run's mixers {names}")
    return opts


def describe_setup(opts, device: torch.device, dtype: torch.dtype) -> str:
    kernels = select_kernels(device, opts.scan_kernel, opts.attention_kernel)
    return (f"D={opts.dim} H={opts.heads} d={opts.dim // opts.heads} G={opts.groups} "
            f"{opts.dtype}, train/prefill {opts.tokens} tokens per step, decode batch "
            f"{opts.decode_batch}, median of >= {opts.repeats} timed calls (fewer past "
            f"{opts.max_case_seconds:g} s, more until {opts.min_case_seconds:g} s) after "
            f"{opts.warmup} warm-up; mixer kernels {kernels.scan} scan, {kernels.attention} "
            f"attention; decode attention "
            f"{bench.decode_kernel(device, dtype, opts.dim // opts.heads)}"
            f"{', CUDA-graph replays' if opts.cuda_graph else ''}")


def run_cases(opts, device: torch.device, dtype: torch.dtype):
    """Yield the record of every (mode, T or P, mixer) case of ``opts``, in order."""
    _, attention_kernel = attention_backend(device)
    with attention_kernel:
        for mode in opts.modes:
            for seq_len in opts.decode_positions if mode == "decode" else opts.seq_lens:
                for name, spec in mixer_specs(opts.chunk_sizes, opts.window, opts.mixers):
                    yield run_case(name, spec, mode, seq_len, opts, device, dtype)


def main(argv=None) -> None:
    opts = parse_args(argv)
    device = bench.parse_device(opts.device)
    dtype = bench.parse_dtype(opts.dtype)
    backend, _ = attention_backend(device)
    info = bench.machine_info(device)
    names = [n for n, _ in mixer_specs(opts.chunk_sizes, opts.window, opts.mixers)]
    setup = describe_setup(opts, device, dtype)
    print(f"machine: {bench.describe_machine(info)}")
    print(f"attention kernel: {backend}")
    print(f"block: {setup}", flush=True)

    records = []
    for record in run_cases(opts, device, dtype):
        records.append(record)
        print(f"  {record['mode']:7s} T={record['seq_len']:<7d} {record['mixer']:10s} "
              f"{bench.fmt_ms(record['ms'])} ms {record.get('error', '')}", flush=True)

    headers, rows = summarize(records, names)
    print()
    print(bench.text_table(headers, rows))
    command = "python tools/bench_block.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = opts.out_dir
    payload = dict(tool="bench_block", command=command, machine=info, attention_kernel=backend,
                   setup=setup, records=records)
    bench.write_json(out / f"bench_block_{device.type}.json", payload)
    markdown = (f"Machine: {bench.describe_machine(info)}  \nAttention kernel: {backend}  \n"
                f"Block: {setup}  \nCommand: `{command}`\n\n"
                + bench.markdown_table(headers, rows) + "\n")
    bench.write_text(out / f"bench_block_{device.type}.md", markdown)
    png = out / f"bench_block_{device.type}.png"
    title = f"{bench.describe_machine(info)}; {setup}"
    if plot(records, names, opts.modes, title, png):
        print(f"wrote {png}")
    print(f"wrote {out / f'bench_block_{device.type}.json'} and .md")


if __name__ == "__main__":
    main()

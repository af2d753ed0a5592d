"""Microbenchmark of the mixing core alone: ``rat_mixing`` forward + backward against causal
SDPA on the same q, k, v (no projections, no norm).

    python tools/bench_mixing.py                   # CPU: B=1, H=4, d=64, L=16, T = 4K and 16K
    python tools/bench_mixing.py --device cuda --heads 16 --head-dim 128 --dtype bf16
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from rat_plugin.ops import rat_mixing  # noqa: E402


def make_inputs(batch, seq_len, heads, head_dim, device, dtype):
    shape = (batch, seq_len, heads, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    gate = torch.rand(shape, device=device, dtype=torch.float32)
    return q, k, v, gate


def rat_step(q, k, v, gate, chunk_size):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gate)]

    def step():
        rat_mixing(*leaves, chunk_size).sum().backward()
        for t in leaves:
            t.grad = None

    return step


def sdpa_step(q, k, v):
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]

    def step():
        F.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()
        for t in leaves:
            t.grad = None

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    opts = parser.parse_args(argv)
    device = bench.parse_device(opts.device)
    dtype = bench.parse_dtype(opts.dtype)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    info = bench.machine_info(device)
    print(f"machine: {bench.describe_machine(info)}")
    print(f"B={opts.batch} H={opts.heads} d={opts.head_dim} L={opts.chunk_size} {opts.dtype}, "
          f"forward + backward, median of {opts.repeats} after {opts.warmup} warm-up", flush=True)

    records, rows = [], []
    for seq_len in opts.seq_lens:
        torch.manual_seed(0)
        inputs = make_inputs(opts.batch, seq_len, opts.heads, opts.head_dim, device, dtype)
        ms = {}
        for name, step in (("rat_mixing", rat_step(*inputs, opts.chunk_size)),
                           ("sdpa_causal", sdpa_step(*inputs[:3]))):
            times = bench.time_ms(step, device, opts.warmup, opts.repeats)
            ms[name] = bench.median(times)
            records.append(dict(kernel=name, seq_len=seq_len, ms=ms[name], times_ms=times))
        rows.append([str(seq_len), bench.fmt_ms(ms["rat_mixing"]), bench.fmt_ms(ms["sdpa_causal"]),
                     bench.fmt_ratio(ms["sdpa_causal"], ms["rat_mixing"])])
    headers = ["T", "rat_mixing ms", "sdpa causal ms", "sdpa/rat"]
    print(bench.text_table(headers, rows))
    command = "python tools/bench_mixing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bench.write_json(opts.out_dir / f"bench_mixing_{device.type}.json",
                     dict(tool="bench_mixing", command=command, machine=info,
                          options={k: str(v) for k, v in vars(opts).items()}, records=records))


if __name__ == "__main__":
    main()

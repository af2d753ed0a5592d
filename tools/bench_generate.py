"""Whole-model generation speed, RAT against attention with the same backbone (paper Table 1).

For rat, rat_swa, rat_attn and rat_attn_swa: the largest batch whose decode caches fit a memory
budget (cuda: the largest that does not run out of memory), prefill of the prompt, then one-token
decode steps (greedy); tokens/s = batch * generated tokens / time. Then the latency of one decode
step at fixed batch at several positions (caches filled through their ``fill`` with random
states, no quadratic prefill), with each model's cache bytes per sequence.

    python tools/bench_generate.py --device cpu     # debugmodel, shortened prompt/generation
    python tools/bench_generate.py --device cuda    # 1.3B, prompt 3072, generate 1024, bf16
    python tools/bench_generate.py --device cuda --cuda-graph   # decode steps as graph replays
"""

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from rat_plugin.generate.step import DecodeStep  # noqa: E402
from rat_plugin.model.args import MODEL_KINDS, make_args  # noqa: E402
from rat_plugin.model.model import RATModel  # noqa: E402

DEFAULTS = {
    "cuda": dict(flavor="1.3B", dtype="bf16", prompt=3072, generate=1024, max_batch=1024,
                 cache_budget_gib=None, positions=[4096, 8192, 16384, 32768], latency_batch=16),
    "cpu": dict(flavor="debugmodel", dtype="fp32", prompt=1024, generate=128, max_batch=64,
                cache_budget_gib=0.0625, positions=[4096, 8192, 16384, 32768], latency_batch=8),
}


def build_model(kind: str, flavor: str, device, dtype) -> RATModel:
    """Random weights, initialised on ``device`` (a 1.3B model in seconds on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = RATModel(make_args(kind, flavor))
        model.init_weights()
    return model.to(dtype=dtype).eval()


def generate(model: RATModel, batch: int, prompt: int, steps: int, device,
             cuda_graph: bool = False) -> dict:
    """Greedy generation from random prompts; prefill and decode wall times (decode includes
    the CUDA-graph capture)."""
    tokens = torch.randint(model.args.vocab_size, (batch, prompt), device=device)
    lengths = torch.full((batch,), prompt, device=device)
    with torch.inference_mode():
        caches = model.new_caches(lengths, prompt + steps - 1)
        timer = bench.Stopwatch(device)
        next_token = model(tokens, caches=caches, logits_at=lengths - 1).argmax(-1)
        prefill_s = timer.lap()
        step = DecodeStep(model, caches, cuda_graph)
        for _ in range(steps - 1):
            next_token = step(next_token).argmax(-1)
        decode_s = timer.lap()
    return dict(prefill_s=prefill_s, decode_s=decode_s,
                cache_bytes_per_sequence=cache_bytes(caches))


def cache_bytes(caches: list) -> int:
    return sum(cache.nbytes_per_sequence() for cache in caches)


def filled_caches(model: RATModel, batch: int, position: int, spare: int, device) -> list:
    """Caches holding ``position`` tokens per sequence, room for ``spare`` more."""
    caches = model.new_caches(torch.full((batch,), position, device=device), position + spare)
    for cache in caches:
        bench.fill_randomly(cache, position, model.args.n_heads, model.args.head_dim)
    return caches


def fitting_batch(model, opts, device) -> int:
    """Largest batch (power of two, at most max_batch) whose caches at the final position fit
    the budget; on cuda without a budget, the largest whose generation runs without OOM."""
    final = opts.prompt + opts.generate
    if opts.cache_budget_gib is not None:
        per_sequence = cache_bytes(filled_caches(model, 1, final, 0, device))
        fits = int(opts.cache_budget_gib * 2**30 // per_sequence)
        batch = 1
        while batch * 2 <= min(fits, opts.max_batch):
            batch *= 2
        return batch
    batch, best = 1, 0
    while batch <= opts.max_batch:
        try:
            generate(model, batch, opts.prompt, 2, device, opts.cuda_graph)
            caches = filled_caches(model, batch, final, 0, device)
            del caches
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if not best:
        raise SystemExit("batch 1 does not fit on this GPU: use a smaller --flavor")
    return best


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=list(MODEL_KINDS), choices=list(MODEL_KINDS))
    parser.add_argument("--flavor", help="model size (cpu debugmodel, cuda 1.3B)")
    parser.add_argument("--dtype", help="fp32, bf16 or fp16 (cpu fp32, cuda bf16)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (cpu 1024, cuda 3072)")
    parser.add_argument("--generate", type=int, help="generated tokens (cpu 128, cuda 1024)")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--cache-budget-gib", type=float,
                        help="memory the decode caches may use (cpu 1/16 GiB; cuda: until OOM)")
    parser.add_argument("--positions", type=int, nargs="+", help="decode latency positions")
    parser.add_argument("--latency-batch", type=int, help="batch of the latency measurement")
    parser.add_argument("--latency-steps", type=int, default=5)
    bench.add_run_options(parser)
    return bench.parse_run(parser, argv, DEFAULTS)


def describe_setup(opts, device, dtype) -> str:
    head_dim = make_args(opts.kinds[0], opts.flavor).head_dim
    budget = ("until out of memory" if opts.cache_budget_gib is None
              else f"caches within {opts.cache_budget_gib:g} GiB")
    return (f"flavor {opts.flavor} {opts.dtype}, prompt {opts.prompt}, generate "
            f"{opts.generate}, batch: largest power of two <= {opts.max_batch} with {budget}; "
            f"decode attention {bench.decode_kernel(device, dtype, head_dim)}"
            f"{', CUDA-graph replays' if opts.cuda_graph else ''}")


def measure(kind: str, opts, device, dtype) -> tuple[dict, list[dict]]:
    """One model: generation throughput at the largest batch that fits, then the latency of
    a decode step at each position. Returns (throughput record, latency records)."""
    model = build_model(kind, opts.flavor, device, dtype)
    batch = fitting_batch(model, opts, device)
    generate(model, min(batch, 2), min(opts.prompt, 64), 2, device, opts.cuda_graph)  # warm-up
    run = generate(model, batch, opts.prompt, opts.generate, device, opts.cuda_graph)
    run.update(kind=kind, batch=batch,
               decode_tokens_per_s=batch * (opts.generate - 1) / run["decode_s"],
               total_tokens_per_s=batch * opts.generate / (run["prefill_s"] + run["decode_s"]))
    print(f"  {kind:13s} batch {batch:5d}  {run['total_tokens_per_s']:9.1f} tok/s "
          f"(decode only {run['decode_tokens_per_s']:.1f})", flush=True)
    latency = []
    for position in opts.positions:
        try:
            caches = filled_caches(model, opts.latency_batch, position, opts.latency_steps + 1,
                                   device)
            token = torch.randint(model.args.vocab_size, (opts.latency_batch,), device=device)
            with torch.inference_mode():
                step = functools.partial(DecodeStep(model, caches, opts.cuda_graph), token)
                times = bench.time_ms(step, device, warmup=1, repeats=opts.latency_steps)
            ms, nbytes = bench.median(times), cache_bytes(caches)
        except torch.OutOfMemoryError:
            ms, nbytes = None, None
        latency.append(dict(kind=kind, position=position, batch=opts.latency_batch, ms=ms,
                            cache_bytes_per_sequence=nbytes))
        print(f"  {kind:13s} decode step at {position:6d}: {bench.fmt_ms(ms)} ms", flush=True)
    return run, latency


BASELINE = {"rat": "rat_attn", "rat_swa": "rat_attn_swa"}


def tables(throughput: list[dict], latency: list[dict]) -> list[tuple[list, list]]:
    """(headers, rows) of the throughput table and of the decode-latency table, each model
    against its attention baseline when that was measured too."""
    by_kind = {r["kind"]: r for r in throughput}
    t_headers = ["model", "batch", "tokens/s", "decode-only tokens/s", "vs attention",
                 "cache bytes/seq at end"]
    t_rows = []
    for r in throughput:
        base = by_kind.get(BASELINE.get(r["kind"], ""))
        ratio = "-" if base is None else bench.fmt_ratio(r["total_tokens_per_s"],
                                                         base["total_tokens_per_s"])
        t_rows.append([r["kind"], str(r["batch"]), f"{r['total_tokens_per_s']:.1f}",
                       f"{r['decode_tokens_per_s']:.1f}", ratio,
                       f"{r['cache_bytes_per_sequence']:,}"])
    l_headers = ["model", "position", "batch", "step ms", "attention/this", "cache bytes/seq"]
    l_rows = []
    for r in latency:
        base = next((b for b in latency if b["kind"] == BASELINE.get(r["kind"])
                     and b["position"] == r["position"]), None)
        l_rows.append([r["kind"], str(r["position"]), str(r["batch"]), bench.fmt_ms(r["ms"]),
                       bench.fmt_ratio(base["ms"], r["ms"]) if base else "-",
                       "-" if r["cache_bytes_per_sequence"] is None
                       else f"{r['cache_bytes_per_sequence']:,}"])
    return [(t_headers, t_rows), (l_headers, l_rows)]


def main(argv=None) -> None:
    opts = parse_args(argv)
    device = bench.parse_device(opts.device)
    dtype = bench.parse_dtype(opts.dtype)
    info = bench.machine_info(device)
    setup = describe_setup(opts, device, dtype)
    print(f"machine: {bench.describe_machine(info)}")
    print(f"generation: {setup}")
    if device.type == "cpu":
        print("(CPU run: a small flavor and a shortened prompt/generation, not the paper's 1.3B "
              "model with prompt 3072 and 1024 generated tokens)")

    throughput, latency = [], []
    for kind in opts.kinds:
        run, steps = measure(kind, opts, device, dtype)
        throughput.append(run)
        latency += steps

    (t_headers, t_rows), (l_headers, l_rows) = tables(throughput, latency)
    print()
    print(bench.text_table(t_headers, t_rows))
    print()
    print(bench.text_table(l_headers, l_rows))
    command = "python tools/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = opts.out_dir
    bench.write_json(out / f"bench_generate_{device.type}.json",
                     dict(tool="bench_generate", command=command, machine=info, setup=setup,
                          throughput=throughput, latency=latency))
    bench.write_text(out / f"bench_generate_{device.type}.md",
                     f"Machine: {bench.describe_machine(info)}  \nGeneration: {setup}  \n"
                     f"Command: `{command}`\n\n" + bench.markdown_table(t_headers, t_rows)
                     + "\n\n" + bench.markdown_table(l_headers, l_rows) + "\n")
    print(f"wrote {out / f'bench_generate_{device.type}.json'} and .md")


if __name__ == "__main__":
    main()

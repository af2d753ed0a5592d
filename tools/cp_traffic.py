"""Bytes a context-parallel rank sends per training step: RAT summary all-gather vs ring attention.

    python tools/cp_traffic.py [--flavor 1.3B] [--seq-len 4096] [--cp 2 4 8] [--batch 1]
                               [--dtype bf16]

1. Measures: one real forward + backward of a small RAT model on CPU, as CP rank 0 of a
   headtail split, with ``SummaryAllGather.all_gather`` instrumented (identity instead of the
   collective): the bytes of every tensor the exchange all-gathers in forward, and of every
   gradient it reduce-scatters in backward. Checks that the formula below gives the same bytes.
2. Extrapolates with that formula to the requested shape and prints, per rank and step (all
   layers, ``batch`` sequences per rank), what RAT sends next to ring attention.

Counting (ring collectives, per rank): an all-gather or reduce-scatter of cp pieces of P bytes
sends (cp - 1) * P. RAT per layer: forward all-gathers [K | V] summaries of T/(cp*L) chunks in
the accumulation dtype (fp32 for bf16 training) and their int64 chunk ids; backward
reduce-scatters the [K | V] gradients. Ring attention per layer (torch's SDPA context parallel):
forward passes the local K and V (T/cp tokens, training dtype) cp - 1 times; backward passes
K, V and their gradients dK, dV cp - 1 times.
"""

import argparse

import torch

from rat_plugin.infra.context_parallel import SummaryAllGather
from rat_plugin.model.args import make_args
from rat_plugin.model.model import RATModel
from rat_plugin.ops.chunk_scan import accumulation_dtype

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class RecordingExchange(SummaryAllGather):
    """The real exchange with the collective replaced by identity plus byte counting."""

    def __init__(self):
        super().__init__(cp_mesh=None)
        self.forward_bytes = 0
        self.backward_bytes = 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.forward_bytes += tensor.nbytes
        if tensor.requires_grad:
            tensor.register_hook(self._count_grad)
        return tensor

    def _count_grad(self, grad: torch.Tensor) -> None:
        self.backward_bytes += grad.nbytes


def rat_piece_bytes(args, seq_len: int, cp: int, batch: int, dtype: torch.dtype) -> tuple[int, int]:
    """(forward, backward) bytes of one rank's local summaries in one layer."""
    chunks = seq_len // (cp * args.chunk_size)
    size = accumulation_dtype(dtype).itemsize
    kv = batch * chunks * args.n_heads * 2 * args.head_dim * size
    return kv + chunks * torch.int64.itemsize, kv


def ring_piece_bytes(
    args, seq_len: int, cp: int, batch: int, dtype: torch.dtype
) -> tuple[int, int]:
    """(forward, backward) bytes of one rank's local K and V (and dK, dV) in one layer."""
    kv = batch * (seq_len // cp) * args.n_heads * 2 * args.head_dim * dtype.itemsize
    return kv, 2 * kv


def measure(seq_len: int = 256, cp: int = 2, batch: int = 2) -> tuple[dict, tuple[int, int]]:
    """Instrumented fwd+bwd of the debug RAT model as rank 0 of a headtail split."""
    torch.manual_seed(0)
    args = make_args("rat", "debugmodel")
    model = RATModel(args)
    model.init_weights()
    exchanges = []
    for block in model.layers.values():
        block.mixer.summary_exchange = RecordingExchange()
        exchanges.append(block.mixer.summary_exchange)
    pieces = torch.arange(seq_len).chunk(2 * cp)
    positions = torch.cat((pieces[0], pieces[-1]))[None].expand(batch, -1)
    tokens = torch.randint(0, args.vocab_size, positions.shape)
    model(tokens, positions=positions).float().square().mean().backward()
    measured = dict(
        forward=sum(e.forward_bytes for e in exchanges) // args.n_layers,
        backward=sum(e.backward_bytes for e in exchanges) // args.n_layers,
    )
    return measured, rat_piece_bytes(args, seq_len, cp, batch, torch.float32)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="1.3B")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    a = parser.parse_args()

    measured, formula = measure()
    print("measured, debugmodel, T=256, cp=2 rank 0, batch 2, fp32, per layer:")
    print(f"  summaries sent to the all-gather: {measured['forward']} B (formula {formula[0]} B)")
    print(f"  gradients into the reduce-scatter: {measured['backward']} B (formula {formula[1]} B)")
    if (measured["forward"], measured["backward"]) != formula:
        raise SystemExit("the formula does not match the instrumented exchange")

    try:
        args = make_args("rat", a.flavor)
        args.check_seq_len(a.seq_len)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    dtype = DTYPES[a.dtype]
    print(
        f"\n{a.flavor}: {args.n_layers} layers, H={args.n_heads}, d={args.head_dim}, "
        f"L={args.chunk_size}, T={a.seq_len}, batch {a.batch}/rank, {a.dtype} "
        f"(RAT summaries in {accumulation_dtype(dtype)}). Bytes sent per rank per step:"
    )
    columns = ("RAT fwd", "RAT bwd", "ring fwd", "ring bwd")
    print(f"{'cp':>4}" + "".join(f"{c:>13}" for c in columns) + f"{'ring/RAT':>10}")
    for cp in a.cp:
        if a.seq_len % (2 * cp * args.chunk_size):
            print(f"{cp:>4}  seq_len {a.seq_len} is not a multiple of 2*cp*L: skipped")
            continue
        rat = [
            (cp - 1) * b * args.n_layers
            for b in rat_piece_bytes(args, a.seq_len, cp, a.batch, dtype)
        ]
        ring = [
            (cp - 1) * b * args.n_layers
            for b in ring_piece_bytes(args, a.seq_len, cp, a.batch, dtype)
        ]
        print(
            f"{cp:>4}" + "".join(f"{_fmt(b):>13}" for b in (*rat, *ring))
            + f"{sum(ring) / sum(rat):>9.1f}x"
        )


if __name__ == "__main__":
    main()

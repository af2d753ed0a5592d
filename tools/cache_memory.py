"""Decode-cache memory per sequence (docs/design.md section 3): RAT vs attention vs SWA.

    python tools/cache_memory.py [--flavor 1.3B] [--dtype bf16] [--positions 1024 4096 16384]

Figures come from ``rat_plugin.generate.cache_bytes``, the formula that tests/test_generate.py
checks against the caches' own ``nbytes_per_sequence()``.
"""

import torch

from rat_plugin.generate import cache_bytes
from rat_plugin.generate.arguments import OneLineParser
from rat_plugin.generate.memory import human_bytes
from rat_plugin.model import FLAVORS, MODEL_KINDS, make_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="1.3B", choices=list(FLAVORS))
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    args = parser.parse_args()
    for position in args.positions:
        if position < 1:
            parser.error(f"argument --positions: {position} is not a position: give counts >= 1")
    dtype = DTYPES[args.dtype]
    models = {kind: make_args(kind, args.flavor) for kind in MODEL_KINDS}
    shape = models["rat"]
    print(
        f"{args.flavor}: {shape.n_layers} layers, H={shape.n_heads}, d={shape.head_dim}, "
        f"L={shape.chunk_size}, SWA window={models['rat_swa'].swa_window}, {args.dtype} cache"
    )
    header = f"{'position':>9}" + "".join(f"{kind:>14}" for kind in models) + f"{'attn/rat':>10}"
    print(header)
    for position in args.positions:
        sizes = {kind: cache_bytes(m, position, dtype) for kind, m in models.items()}
        ratio = sizes["rat_attn"] / sizes["rat"]
        cells = "".join(f"{human_bytes(b):>14}" for b in sizes.values())
        print(f"{position:>9}{cells}{ratio:>10.1f}")


if __name__ == "__main__":
    main()

"""Convert a torchtitan DCP checkpoint of a RAT model to a standalone folder, or back.

    python tools/convert_checkpoint.py OUTPUTS/checkpoint/step-100 rat_model \\
        --config train_configs/rat_debug.toml --tokenizer assets/tokenizer [--dtype bf16] [--force]
    python tools/convert_checkpoint.py rat_model seed_ckpt --to-dcp [--force]

The standalone folder (model.safetensors, config.json, tokenizer) is what
``python -m rat_plugin.generate --model rat_model`` loads. The reverse direction writes a
model-only DCP checkpoint for ``checkpoint.initial_load_path``.
"""

import argparse
import sys

from rat_plugin.convert import (
    DTYPES,
    ConversionError,
    dcp_to_standalone,
    spec_from_config,
    standalone_to_dcp,
    tokenizer_from_config,
)
from rat_plugin.generate.arguments import OneLineParser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="DCP step folder (or, with --to-dcp, a standalone folder)")
    parser.add_argument("out", help="output folder (written atomically)")
    parser.add_argument("--to-dcp", action="store_true", help="standalone folder -> DCP checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the source's dtype")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--config", help="training TOML: model kind, flavor and seq_len")
    parser.add_argument("--model-name", "--model.name", dest="model_name", help="model kind")
    parser.add_argument("--flavor", "--model.flavor", dest="flavor", help="model flavor")
    parser.add_argument("--seq-len", "--training.seq_len", dest="seq_len", type=int,
                        help="training sequence length recorded as max_seq_len")
    parser.add_argument("--tokenizer", "--model.hf_assets_path", dest="tokenizer",
                        help="folder with tokenizer.json to copy into the output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.to_dcp:
            standalone_to_dcp(args.src, args.out, dtype=dtype, force=args.force)
        else:
            spec = spec_from_config(args.config, args.model_name, args.flavor, args.seq_len)
            tokenizer = args.tokenizer or (args.config and tokenizer_from_config(args.config))
            dcp_to_standalone(args.src, args.out, spec, dtype, args.force, tokenizer or None)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

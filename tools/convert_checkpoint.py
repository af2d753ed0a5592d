"""Convert a torchtitan DCP checkpoint of a RAT model to a standalone folder, or back; import a
checkpoint of the paper's code.

    python tools/convert_checkpoint.py OUTPUTS/checkpoint/step-100 rat_model \\
        --config train_configs/rat_debug.toml --tokenizer assets/tokenizer [--dtype bf16] [--force]
    python tools/convert_checkpoint.py rat_model seed_ckpt --to-dcp [--force]
    python tools/convert_checkpoint.py paper_run/1000.pth rat_model --from-paper [--to-dcp]
    python tools/convert_checkpoint.py rat_model rat_hf --to-hf    # needs the hf extra

The standalone folder (model.safetensors, config.json, tokenizer) is what
``python -m rat_plugin.generate --model rat_model`` loads. ``--to-dcp`` writes a model-only DCP
checkpoint for ``checkpoint.initial_load_path``; ``--to-hf`` a folder that transformers'
``AutoModelForCausalLM.from_pretrained`` loads (``trust_remote_code=True`` where rat_plugin is
not installed: it carries its code).
"""

import argparse
import sys
from pathlib import Path

from rat_plugin.convert import (
    ConversionError,
    dcp_to_standalone,
    spec_from_config,
    standalone_to_dcp,
    tokenizer_from_config,
)
from rat_plugin.folder import DTYPES
from rat_plugin.generate.arguments import OneLineParser
from rat_plugin.paper_checkpoint import paper_to_dcp, paper_to_standalone


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="DCP step folder (with --to-dcp a standalone folder, with "
                        "--from-paper a .pth file of the paper's code)")
    parser.add_argument("out", help="output folder (written atomically)")
    parser.add_argument("--to-dcp", action="store_true", help="write a model-only DCP checkpoint")
    parser.add_argument("--to-hf", action="store_true",
                        help="standalone folder -> Hugging Face transformers folder")
    parser.add_argument("--from-paper", action="store_true",
                        help="src is a torch.save checkpoint of the paper's code (CLAIRE-Labo/RAT)")
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


def to_hf(args: argparse.Namespace) -> None:
    if args.to_dcp or args.dtype or args.from_paper:
        raise ConversionError(
            "--to-hf exports a standalone folder as it is: drop --to-dcp, --dtype and "
            "--from-paper (import a paper checkpoint to a folder first)"
        )
    try:
        from rat_plugin.hf.export import folder_to_hf
    except ImportError as err:  # transformers missing: the message names the extra
        raise ConversionError(str(err)) from None

    folder_to_hf(args.src, args.out, args.force)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.to_hf:
            to_hf(args)
        elif args.from_paper:
            if args.config or args.seq_len:
                raise ConversionError(
                    "--from-paper reads the configuration from the checkpoint: drop --config "
                    "and --seq-len (--model-name with --flavor overrides the detected model)"
                )
            spec = spec_from_config(None, args.model_name, args.flavor)
            if args.to_dcp:
                paper_to_dcp(args.src, args.out, spec, dtype, args.force)
            else:
                paper_to_standalone(args.src, args.out, spec, dtype, args.force, args.tokenizer)
        elif Path(args.src).is_file():
            raise ConversionError(
                f"{args.src} is a file: pass --from-paper for a checkpoint of the paper's code"
            )
        elif args.to_dcp:
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

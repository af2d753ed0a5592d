"""Shared parts of the evaluation tools: model flags, loading, and the output folder (JSON + PNG,
written atomically, never over a source)."""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from rat_plugin.convert import ConversionError, check_output, output_folder  # noqa: E402
from rat_plugin.generate import ModelFolderError, load_tokenizer  # noqa: E402
from rat_plugin.generate.__main__ import load_reporting_edits  # noqa: E402
from rat_plugin.generate.arguments import OneLineParser, resolve_device  # noqa: E402
from rat_plugin.generate.loading import special_token_ids  # noqa: E402


def parser(doc: str, out_default: str) -> argparse.ArgumentParser:
    """The flags every evaluation tool takes."""
    p = OneLineParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder from tools/convert_checkpoint.py")
    p.add_argument("--out", default=out_default, help="output folder (JSON + PNG)")
    p.add_argument("--force", action="store_true", help="replace an output folder this tool wrote")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: stored dtype")
    p.add_argument("--cuda-graph", action="store_true", help="decode steps as CUDA graph replays")
    p.add_argument("--no-bos", action="store_true", help="do not start with the BOS token")
    return p


def check_out(args: argparse.Namespace, result_file: str, sources: dict[str, str]) -> None:
    """Refuse an output folder that is, holds or lies in a source (the model folder, input
    files), or that exists without --force or was not written by this tool."""
    sources = {"model folder": args.model, **sources}
    for what, path in sources.items():
        check_output(path, args.out, args.force, what, lambda out: (out / result_file).is_file(),
                     reads=sources.values())


def open_model(args: argparse.Namespace):
    """(model, tokenizer, bos id or None) of --model on --device / --dtype (bos None with
    --no-bos)."""
    args.device = resolve_device(args.device, "--device")
    model = load_reporting_edits(args)
    tokenizer = load_tokenizer(args.model)
    bos, _ = special_token_ids(args.model, tokenizer)
    return model, tokenizer, None if args.no_bos else bos


def write(args: argparse.Namespace, name: str, payload: dict,
          draw: Callable[[object], object]) -> None:
    """``name``.json, and ``name``.png of the figure ``draw(pyplot)`` returns when matplotlib is
    installed, swapped in as the folder --out."""
    plt = bench.pyplot()  # None, after a one-line note, without matplotlib
    with output_folder(Path(args.out), args.force, log=print, reads=[args.model]) as tmp:
        (tmp / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        if plt is not None:
            fig = draw(plt)
            fig.tight_layout()
            fig.savefig(tmp / f"{name}.png", dpi=120)
            plt.close(fig)
    written = f"{name}.json" + (f" and {name}.png" if plt is not None else "")
    print(f"wrote {written} in {args.out}")


def run(main: Callable[[], None]) -> int:
    """``main()`` with the tools' errors as one line: exit code 1."""
    try:
        main()
    except (ModelFolderError, ConversionError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

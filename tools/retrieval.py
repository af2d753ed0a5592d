"""Passkey / needle-in-a-haystack retrieval accuracy by prompt length and needle depth.

    python tools/retrieval.py --model rat_model --out eval/passkey        # filler haystack
    python tools/retrieval.py --model rat_model --haystack essays.txt     # needle in a text
        [--lengths 1024 2048 4096 8192] [--depths 0 0.25 0.5 0.75 1] [--trials 5]
        [--batch-size 8] [--device cuda --dtype bf16 --cuda-graph] [--seed 0] [--no-bos]

Each prompt (rat_plugin/eval/retrieval.py) hides a 5-digit pass key at a depth of a haystack and
ends with "The pass key is"; the model answers greedily through the decode cache (one prefill,
then a few cached decode steps), and is right when the first number it generates is the key.
Lengths default to 1K doubling up to twice the model's training length. Writes retrieval.json
(accuracy per length and depth; per trial the key and the text answered, so a 0% can be told
from a near miss) and retrieval.png (a length x depth map of right answers on a log length
axis that always reaches the training length; matplotlib, the bench extra) to --out.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402
import _eval_common as common  # noqa: E402

from rat_plugin.eval import retrieval  # noqa: E402
from rat_plugin.generate import generate  # noqa: E402
from rat_plugin.generate.arguments import read_text_file  # noqa: E402

NAME = "retrieval"
ANSWER_TOKENS = 8  # a 5-digit key and some slack


def parse_args(argv=None):
    parser = common.parser(__doc__, "eval/retrieval")
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--trials", type=int, default=5, help="keys per length and depth")
    parser.add_argument("--haystack", help="text file whose sentences are the haystack")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lengths is not None and min(args.lengths) < 1:
        parser.error(f"argument --lengths: {min(args.lengths)} is not a length >= 1")
    if not all(0 <= d <= 1 for d in args.depths):
        parser.error(f"argument --depths: {args.depths} must lie in [0, 1]")
    if args.trials < 1 or args.batch_size < 1:
        parser.error("arguments --trials and --batch-size must be >= 1")
    if args.haystack and not Path(args.haystack).is_file():
        parser.error(f"argument --haystack: {args.haystack} is not a file")
    return args


def default_lengths(train_length: int) -> list[int]:
    lengths = [1024]
    while lengths[-1] < 2 * train_length:
        lengths.append(2 * lengths[-1])
    return lengths


def plot(cells: list[retrieval.Cell], train_length: int, title: str):
    """A length x depth map of right answers. The length axis is logarithmic and each column
    spans the geometric midpoints around its length, so the training length is drawn at its own
    value (not on a column boundary) and the axis always reaches it, even when every tested
    length lies beyond it."""
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    by_cell = {(c.length, c.depth): c for c in cells}
    ratios = [b / a for a, b in zip(lengths, lengths[1:])] or [2.0]
    edges = ([lengths[0] / math.sqrt(ratios[0])]
             + [math.sqrt(a * b) for a, b in zip(lengths, lengths[1:])]
             + [lengths[-1] * math.sqrt(ratios[-1])])

    def draw(plt):
        fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(lengths) + 4.5),
                                        0.45 * len(depths) + 2.8))
        grid = [[by_cell[(n, d)].accuracy for n in lengths] for d in depths]
        image = ax.pcolormesh(edges, range(len(depths) + 1), grid, vmin=0, vmax=1,
                              cmap="RdYlGn")
        for row, depth in enumerate(depths):
            for n in lengths:
                cell = by_cell[(n, depth)]
                ax.text(n, row + 0.5, f"{cell.correct}/{cell.trials}", ha="center",
                        va="center", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.2", facecolor="white", alpha=0.8,
                                  linewidth=0))
        ax.set_xscale("log")
        ax.set_xlim(min(edges[0], train_length / 1.5), max(edges[-1], train_length * 1.5))
        ax.set_ylim(len(depths), 0)  # depth 0 (the needle first) at the top
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_yticks([row + 0.5 for row in range(len(depths))], [f"{d:g}" for d in depths])
        ax.axvline(train_length, color="black", linestyle="--", linewidth=1.5,
                   label=f"training length {train_length}")
        outside = ("every tested length is beyond it" if train_length < lengths[0] else
                   "every tested length is within it" if train_length > lengths[-1] else None)
        if outside:  # the line stands in an untested stretch of the axis: say what it is
            ax.annotate(f"training length {train_length}:\n{outside}", (train_length, 0.5),
                        xycoords=("data", "axes fraction"), rotation=90, ha="right",
                        va="center", fontsize=8, xytext=(-4, 0), textcoords="offset points")
        ax.set_xlabel("prompt length (tokens, log scale)")
        ax.set_ylabel("needle depth (0: start)")
        ax.set_title(title, fontsize=9, pad=20)  # the legend sits between title and map
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, frameon=False)
        fig.colorbar(image, ax=ax, label="accuracy (right answers / trials)")
        return fig

    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(lambda: evaluate(args))


def evaluate(args) -> None:
    common.check_out(args, f"{NAME}.json", {"haystack": args.haystack} if args.haystack else {})
    model, tokenizer, bos = common.open_model(args)
    train_length = model.args.max_seq_len
    haystack = (retrieval.sentences(read_text_file(args.haystack, "--haystack"))
                if args.haystack else None)
    builder = retrieval.PromptBuilder(
        lambda text: tokenizer.encode(text, add_special_tokens=False).ids, bos, haystack)

    def answer(prompts: list[list[int]]) -> list[str]:
        result = generate(model, prompts, ANSWER_TOKENS, cuda_graph=args.cuda_graph)
        return [tokenizer.decode(tokens) for tokens in result.tokens]

    lengths = args.lengths or default_lengths(train_length)
    cells = retrieval.run(builder, answer, lengths, args.depths, args.trials, args.seed,
                          args.batch_size)
    headers = ["length"] + [f"depth {d:g}" for d in args.depths] + ["mean"]
    rows = [[str(n)] + [f"{c.accuracy:.2f}" for c in cells if c.length == n]
            + [f"{sum(c.accuracy for c in cells if c.length == n) / len(args.depths):.2f}"]
            for n in lengths]
    print(bench.text_table(headers, rows))
    payload = {
        "model": str(args.model),
        "haystack": args.haystack or "filler",
        "train_length": train_length,
        "lengths": list(lengths),
        "depths": list(args.depths),
        "trials": args.trials,
        "seed": args.seed,
        "bos": bos is not None,
        "accuracy": [[c.accuracy for c in cells if c.length == n] for n in lengths],
        "cells": [vars(c) | {"accuracy": c.accuracy} for c in cells],
    }
    source = Path(args.haystack).name if args.haystack else "passkey filler"
    title = (f"pass key retrieval: {Path(args.model).name}, {args.trials} keys per cell, "
             f"{source}")
    common.write(args, NAME, payload, plot(cells, train_length, title))


if __name__ == "__main__":
    sys.exit(main())

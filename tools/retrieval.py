"""Passkey / needle-in-a-haystack retrieval accuracy by prompt length and needle depth.

    python tools/retrieval.py --model rat_model --out eval/passkey        # filler haystack
    python tools/retrieval.py --model rat_model --haystack essays.txt     # needle in a text
        [--lengths 1024 2048 4096 8192] [--depths 0 0.25 0.5 0.75 1] [--trials 5]
        [--batch-size 8] [--device cuda --dtype bf16 --cuda-graph] [--seed 0] [--no-bos]

Each prompt (rat_plugin/eval/retrieval.py) hides a 5-digit pass key at a depth of a haystack and
ends with "The pass key is"; the model answers greedily through the decode cache (one prefill,
then a few cached decode steps), and is right when the first number it generates is the key.
Lengths default to 1K doubling up to twice the model's training length. Writes retrieval.json
(accuracy per length and depth) and retrieval.png (a length x depth map; matplotlib, the bench
extra) to --out.
"""

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
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    accuracy = {(c.length, c.depth): c.accuracy for c in cells}

    def draw(plt):
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
        grid = [[accuracy[(n, d)] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        within = sum(n <= train_length for n in lengths)
        if 0 < within < len(lengths):  # a line between the last length within and the rest
            ax.axvline(within - 0.5, color="black", linestyle="--")
        ax.set_xlabel(f"prompt length (tokens; training length {train_length})")
        ax.set_ylabel("needle depth")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, label="accuracy")
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
    title = f"{NAME}: {args.model} ({args.haystack or 'passkey filler'})"
    common.write(args, NAME, payload, plot(cells, train_length, title))


if __name__ == "__main__":
    sys.exit(main())

"""Loss (and perplexity) by token position over a text file: does the model keep using context
past its training length?

    python tools/perplexity_by_position.py --model rat_model --text book.txt --out eval/ppl
        [--length 16384] [--windows 4] [--prefill 4096] [--bucket 256]
        [--device cuda --dtype bf16 --cuda-graph] [--no-bos]

The text is tokenized and cut into --windows consecutive windows of --length tokens (each after
BOS unless --no-bos). Each window is scored through the decode cache: one prefill forward over
its first --prefill tokens (default: the training length), then one cached decode step per token,
so memory stays that of the caches (O(T / L) per RAT layer) however long the window. The loss of
every position is averaged over the windows. Length defaults to 4x the training length. Writes
perplexity_by_position.json (per position, per bucket of --bucket positions, and per window and
bucket) and perplexity_by_position.png (mean loss per bucket, the range over the windows around
it, the y axis from 0 so noise does not read as a trend, the training length marked;
matplotlib, the bench extra) to --out.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _eval_common as common  # noqa: E402

from rat_plugin.eval.perplexity import by_position, token_windows  # noqa: E402
from rat_plugin.eval.scoring import position_losses  # noqa: E402
from rat_plugin.generate.arguments import read_text_file  # noqa: E402

NAME = "perplexity_by_position"


def parse_args(argv=None):
    parser = common.parser(__doc__, "eval/perplexity_by_position")
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    parser.add_argument("--length", type=int, help="tokens per window")
    parser.add_argument("--windows", type=int, default=1, help="windows to average over")
    parser.add_argument("--prefill", type=int, help="tokens prefilled before decoding")
    parser.add_argument("--bucket", type=int, help="positions per plotted point")
    args = parser.parse_args(argv)
    for flag in ("length", "windows", "prefill", "bucket"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "length" else 1):
            parser.error(f"argument --{flag}: {value} is too small")
    if args.length and args.prefill and args.prefill >= args.length:
        parser.error(f"argument --prefill: {args.prefill} must be below --length {args.length}")
    if not Path(args.text).is_file():
        parser.error(f"argument --text: {args.text} is not a file")
    return args


def plot(result: dict, train_length: int, title: str):
    """Mean loss per bucket of positions, the range of the windows' own bucket means around it
    (how much of a wiggle is noise), and the training length, which the x axis always reaches.
    The y axis starts at 0 nats: zoomed onto the curve, a noise of 0.01 nats would read as a
    trend; from 0, a change reads at its size against the loss itself."""
    bucket, per_window = result["bucket"], result["loss_by_window"]
    last = len(result["loss_by_position"])  # positions 1..last are scored
    centres = [(p + min(p + bucket - 1, last)) / 2 for p in result["positions"]]
    windows = len(per_window)
    low = [min(column) for column in zip(*per_window)]
    high = [max(column) for column in zip(*per_window)]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(centres, result["loss"], marker=".", color="tab:blue",
                label=f"mean of {windows} window{'s' if windows > 1 else ''}, buckets of "
                      f"{bucket} positions")
        if windows > 1:
            ax.fill_between(centres, low, high, color="tab:blue", alpha=0.25, linewidth=0,
                            label=f"range over the {windows} windows")
        if train_length <= 1.25 * last:
            ax.axvline(train_length, color="black", linestyle="--",
                       label=f"training length {train_length}")
            ax.set_xlim(0, 1.03 * max(last, train_length))
        else:  # far beyond the window: an arrow at the edge, not a curve squeezed to the left
            ax.set_xlim(0, 1.03 * last)
            ax.annotate(f"training length {train_length} \u2192\n(every position is within it)",
                        (1, 0.5), xycoords="axes fraction", ha="right", va="center",
                        fontsize=8, xytext=(-6, 0), textcoords="offset points")
        ax.set_ylim(0, 1.1 * max(high))
        ax.set_xlabel("token position (bucket centres)")
        ax.set_ylabel("loss (nats; axis from 0)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        return fig

    return draw


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(lambda: evaluate(args))


def evaluate(args) -> None:
    common.check_out(args, f"{NAME}.json", {"text file": args.text})
    text = read_text_file(args.text, "--text")
    model, tokenizer, bos = common.open_model(args)
    train_length = model.args.max_seq_len
    length = args.length or 4 * train_length
    prefill = args.prefill or min(train_length, length - 1)
    if prefill >= length:
        raise ValueError(f"--prefill {prefill} must be below the window length {length}")
    windows = token_windows(tokenizer.encode(text, add_special_tokens=False).ids, length,
                            args.windows, bos)
    losses = position_losses(model, windows, prefill, cuda_graph=args.cuda_graph)
    result = by_position(losses.cpu(), args.bucket or max(1, length // 64))
    # Column t predicts token t + 1 from t + 1 tokens: training windows of train_length tokens
    # predicted tokens 1..train_length.
    within = losses[:, :train_length].double().mean().item()
    beyond = (losses[:, train_length:].double().mean().item()
              if losses.shape[1] > train_length else None)
    payload = {
        "model": str(args.model),
        "text": str(args.text),
        "train_length": train_length,
        "length": length,
        "windows": windows.shape[0],
        "prefill": prefill,
        "bos": bos is not None,
        "mean_loss": losses.double().mean().item(),
        "mean_loss_within_train_length": within,
        "mean_loss_beyond_train_length": beyond,
        **result,
    }
    print(f"{windows.shape[0]} window(s) of {length} tokens: mean loss "
          f"{payload['mean_loss']:.4f}, within the training length {within:.4f}"
          + (f", beyond it {beyond:.4f}" if beyond is not None else ""))
    title = (f"loss by position: {Path(args.model).name} on {Path(args.text).name}\n"
             f"{windows.shape[0]} window{'s' if windows.shape[0] > 1 else ''} of {length} "
             f"tokens, buckets of {result['bucket']} positions, prefill {prefill}")
    common.write(args, NAME, payload, plot(result, train_length, title))


if __name__ == "__main__":
    sys.exit(main())

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
perplexity_by_position.json (per position and per bucket of --bucket positions) and
perplexity_by_position.png (loss vs position; matplotlib, the bench extra) to --out.
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
    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(result["positions"], result["loss"], marker=".", label="mean loss")
        if train_length < result["positions"][-1]:
            ax.axvline(train_length, color="black", linestyle="--",
                       label=f"training length {train_length}")
        ax.set_xlabel("token position")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
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
    title = f"{NAME}: {args.model} on {Path(args.text).name}"
    common.write(args, NAME, payload, plot(result, train_length, title))


if __name__ == "__main__":
    sys.exit(main())

"""Generate text from a converted model folder.

    python -m rat_plugin.generate --model rat_model --prompt "Once upon a time" --max-new-tokens 64
    python -m rat_plugin.generate --model rat_model --prompts-file prompts.txt --temperature 0.8
    python -m rat_plugin.generate --model rat_model --prompt-ids "1 450 338"

One prompt streams its continuation to stdout as it is produced; several prompts (one per line
of --prompts-file, or repeated --prompt) run as one batch and print when done. The speed and
cache size per sequence are printed at the end.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

from rat_plugin.generate.arguments import (
    OneLineParser,
    check_count,
    check_prompts,
    check_seed,
    check_temperature,
    check_top_k,
    check_top_p,
    read_text_file,
    resolve_device,
)
from rat_plugin.generate.decode import generate
from rat_plugin.generate.loading import (
    ConfigMismatchWarning,
    ModelFolderError,
    load,
    load_tokenizer,
    special_token_ids,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m rat_plugin.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="folder from tools/convert_checkpoint.py")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    prompts.add_argument("--prompts-file", help="text file, one prompt per non-empty line")
    prompts.add_argument("--prompt-ids", action="append", help='token ids, e.g. "1 450 338"')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop-id", type=int, action="append", default=[],
                        help="stop token id (repeatable); the tokenizer's EOS is one by default")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction,
                        help="prepend the BOS token to text prompts (default: as the model was "
                        "trained, config.json add_bos)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: stored dtype")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture the decode step once and replay it (CUDA only)")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    if args.prompts_file is None:
        return args.prompt
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ModelFolderError(f"prompts file {path} does not exist")
    text = read_text_file(path, "prompts file", "give a UTF-8 text file, one prompt per line")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ModelFolderError(f"prompts file {path} has no non-empty line")
    return lines


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: give integers such as '1 450 338'") from None


def encode_prompts(args: argparse.Namespace, add_bos: bool = True):
    """(token id prompts, tokenizer or None, stop ids) from the command line; text prompts get
    the BOS token if ``--bos``, or without the flag if ``add_bos`` (the model's convention)."""
    texts = read_prompts(args)
    stop = set(args.stop_id)
    if texts is None:
        return [parse_ids(text) for text in args.prompt_ids], None, stop
    tokenizer = load_tokenizer(args.model)
    bos, eos = special_token_ids(args.model, tokenizer)
    prompts = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"prompt {i} ({text!r}) is empty: give some text")
        with_bos = add_bos if args.bos is None else args.bos
        prompts.append([bos, *ids] if with_bos and bos is not None else ids)
    if eos is not None and not args.ignore_eos:
        stop.add(eos)
    return prompts, tokenizer, stop


def check_options(args: argparse.Namespace) -> None:
    """The generation flags, checked before the model loads; the messages name the flag."""
    args.device = resolve_device(args.device, "--device")
    check_count(args.max_new_tokens, "--max-new-tokens")
    check_temperature(args.temperature, "--temperature")
    check_top_k(args.top_k, "--top-k")
    check_top_p(args.top_p, "--top-p")
    check_seed(args.seed, "--seed")


def load_reporting_edits(args: argparse.Namespace):
    """``load`` with a config.json edited after export reported as one ``warning:`` line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(args.model, device=args.device, dtype=args.dtype)
    for warning in caught:
        if issubclass(warning.category, ConfigMismatchWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_options(args)
        model = load_reporting_edits(args)
        prompts, tokenizer, stop = encode_prompts(args, model.config.get("add_bos", True))
        check_prompts(prompts, model.args.vocab_size)
        result = run(model, prompts, args, stop, tokenizer)
    except (ModelFolderError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stats = result.stats
    print(
        f"\n[{stats.new_tokens} tokens in {stats.prefill_s + stats.decode_s:.2f} s: "
        f"{stats.tokens_per_s:.1f} tokens/s ({stats.decode_tokens_per_s:.1f} decoding), "
        f"prompt {stats.prompt_tokens} tokens prefilled in {stats.prefill_s:.2f} s, "
        f"cache {stats.cache_bytes_per_sequence / 2**10:.1f} KiB per sequence]"
    )
    return 0


def run(model, prompts, args, stop, tokenizer):
    def show(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids))

    shown = list(prompts[0])
    printed = show(shown)

    def stream(step: int, tokens: list[int], active: list[bool]) -> None:
        nonlocal printed
        if step == 0:  # the prompt, once generation has passed every check
            sys.stdout.write(printed)
            sys.stdout.flush()
        if active[0]:
            shown.append(tokens[0])
            text = show(shown)
            # Byte-level tokenizers may still rewrite a partial character: print settled text.
            if text.startswith(printed) and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text

    single = len(prompts) == 1
    result = generate(
        model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
        args.seed, stop, on_token=stream if single else None, cuda_graph=args.cuda_graph,
    )
    if single and show(shown) != printed:
        sys.stdout.write(show(shown)[len(printed):] if show(shown).startswith(printed) else "")
    if not single:
        for i, (prompt, tokens) in enumerate(zip(prompts, result.tokens)):
            print(f"[{i}] {show(prompt + tokens)}")
    return result


if __name__ == "__main__":
    sys.exit(main())

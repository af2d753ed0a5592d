"""lm-evaluation-harness's command line with the model ``rat`` registered:

    python -m rat_plugin.eval --model rat --model_args pretrained=rat_model --tasks hellaswag

Everything after ``python -m rat_plugin.eval`` is lm_eval's own arguments (``lm_eval --help``),
except that ``--device`` defaults to cuda where there is one and cpu otherwise (lm_eval's
default is cuda:0).
"""

import sys

import torch


def main() -> int:
    try:
        import rat_plugin.eval.harness  # noqa: F401  (registers "rat")
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from rat_plugin.generate import ModelFolderError

    if not any(arg == "--device" or arg.startswith("--device=") for arg in sys.argv):
        sys.argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]

    try:
        cli_evaluate()
    except (ModelFolderError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

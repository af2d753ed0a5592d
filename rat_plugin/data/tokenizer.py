"""Reading a HuggingFace tokenizer folder with one-line errors that name the bad file (shared by
the trainer's checks and standalone generation; no torchtitan import)."""

import json
import os
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read; the message names it."""


def read_tokenizer(folder: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises bare Exceptions
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerFileError(f"{path} is not a valid tokenizer ({reason})") from None


def read_tokenizer_config(folder: str | os.PathLike) -> dict:
    """``folder/tokenizer_config.json`` as a dict, {} when there is none."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenizerFileError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise TokenizerFileError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def vocab_end(tokenizer) -> int:
    """One past the largest token id, added tokens included (ids need not be contiguous, so
    this can exceed the number of entries)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

"""Checks of the generation arguments at the API boundary.

Each check returns the value in its canonical form or raises, in one line naming the argument
and the fix, a TypeError (wrong kind of value) or a ValueError (wrong value). ``name`` is the
keyword (messages read ``temperature=nan ...``) or the CLI flag (``--temperature nan ...``).
"""

import argparse
import math
import numbers
from collections.abc import Iterable
from pathlib import Path

import torch

from rat_plugin.folder import DTYPES
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes (non-negative)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``error: argument --x: ...``), exit
    code 2; ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _named(name: str, value) -> str:
    return f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _kind_error(name: str, value, wanted: str) -> TypeError:
    return TypeError(f"{_named(name, value)} is a {type(value).__name__}: give {wanted}")


def check_count(value, name: str = "max_new_tokens") -> int:
    if not _is_int(value):
        raise _kind_error(name, value, "a whole number of tokens >= 1")
    if value < 1:
        raise ValueError(f"{_named(name, value)} must be >= 1")
    return int(value)


def check_temperature(value, name: str = "temperature") -> float:
    if not _is_real(value):
        raise _kind_error(name, value, "a number >= 0 (0 is greedy)")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{_named(name, value)} must be finite and >= 0 (0 is greedy)")
    return float(value)


def check_top_k(value, name: str = "top_k") -> int | None:
    if value is None:
        return None
    if not _is_int(value):
        raise _kind_error(name, value, "a whole number >= 1, or None for no top-k")
    if value < 1:
        raise ValueError(f"{_named(name, value)} must be >= 1 (or None for no top-k)")
    return int(value)


def check_top_p(value, name: str = "top_p") -> float | None:
    if value is None:
        return None
    if not _is_real(value):
        raise _kind_error(name, value, "a number in (0, 1], or None for no top-p")
    if not 0 < value <= 1:  # NaN fails too
        raise ValueError(f"{_named(name, value)} must be in (0, 1] (or None for no top-p)")
    return float(value)


def check_seed(value, name: str = "seed") -> int | None:
    if value is None:
        return None
    low, high = SEED_RANGE
    if not _is_int(value):
        raise _kind_error(name, value, f"a whole number in [{low}, 2**64 - 1]")
    if not low <= value <= high:
        raise ValueError(f"{_named(name, value)} is out of range: give a seed in [0, 2**64 - 1]")
    return int(value)


def _token_ids(value, what: str) -> list[int]:
    """The token ids of a list, tuple, 1-D integer tensor or other iterable of ints."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            raise TypeError(
                f"{what} is a {value.dim()}-D {value.dtype} tensor: give a 1-D integer tensor"
            )
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{what} is a {type(value).__name__} ({value!r:.40}): give a list of token ids "
            "(tokenize text first)"
        )
    ids = list(value)
    wrong = [t for t in ids if not _is_int(t)]
    if wrong:
        raise TypeError(
            f"{what} holds non-integer token ids {wrong[:4]!r}: give ints (floats are not "
            "truncated)"
        )
    return [int(t) for t in ids]


def check_stop_tokens(value, name: str = "stop_tokens") -> list[int]:
    if _is_int(value):
        raise TypeError(f"{_named(name, value)} is one int: give a list of token ids, e.g. "
                        f"[{value}]")
    return _token_ids(value, name)


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """A non-empty batch of non-empty token id lists, each id in [0, vocab_size). Any iterable
    of prompts is taken (a generator is consumed once); a 2-D integer tensor is a batch."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts is a {type(prompts).__name__}: give a list of token id lists, e.g. "
            "[[1, 450, 338]]"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    if all(_is_int(p) for p in prompts):
        raise TypeError(
            f"prompts is a flat list of token ids {prompts[:4]}...: give a list of prompts, "
            "e.g. [[1, 450, 338]] for one"
        )
    checked = []
    for i, prompt in enumerate(prompts):
        ids = _token_ids(prompt, f"prompt {i}")
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}"
                ": is the tokenizer the model's?"
            )
        checked.append(ids)
    return checked


def read_text_file(path, name: str, fix: str = "give a UTF-8 text file") -> str:
    """The text of the UTF-8 file ``path`` (``name``: the flag or what the file is), or a
    ValueError naming it: a binary file is not read as text with its bytes replaced."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {name} {path} ({err.strerror or err}): {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}): {fix}"
        ) from None


def resolve_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """None, a name in DTYPES or one of their torch dtypes."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, (str, torch.dtype)):
        raise _kind_error(name, dtype, f"one of {sorted(DTYPES)} or a torch dtype")
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"{_named(name, dtype)} is not a supported model dtype: choose one of "
        f"{sorted(DTYPES)} (torch.float32, torch.bfloat16, torch.float16)"
    )


def resolve_device(device, name: str = "device") -> torch.device:
    """A CPU or an available CUDA device."""
    if not isinstance(device, (str, torch.device)):
        raise _kind_error(name, device, "a device such as 'cpu' or 'cuda:0'")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{_named(name, str(device))}: use cpu or cuda[:N]")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{_named(name, str(device))}: CUDA is not available on this machine: use cpu"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"{_named(name, str(device))}: this machine has {count} CUDA device(s): use "
                f"cuda:0 to cuda:{count - 1}"
            )
    return parsed

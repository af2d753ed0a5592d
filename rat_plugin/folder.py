"""The standalone model folder, described once for the converters that write it and the loader
that reads it (no torchtitan import).

A folder holds ``model.safetensors`` (every parameter under its ``RATModel`` name, the tied head
stored once as ``tok_embeddings.weight``; the exported configuration in the metadata under
``CONFIG_RECORD``), ``config.json`` (``folder_config``) and, when given, the tokenizer files.
"""

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import torch

from rat_plugin.model import MODEL_KINDS, RATModel, RATModelArgs

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TIED_HEAD = "output.weight"
EMBEDDING = "tok_embeddings.weight"
# Trained LM weights stay far below this (RMSNorm gains and outlier features are in the tens):
# beyond it a weight is corruption. It also keeps every weight finite in fp16 (max 65504).
MAX_ABS_WEIGHT = 1e4
# model.safetensors metadata key holding the configuration the converter exported the weights
# with: chunk size, window and RoPE base leave no trace in the shapes, so edits to them in
# config.json can only be detected against this record.
CONFIG_RECORD = "rat_config"
# The dtype names config.json and the command lines use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelFolderError(ValueError):
    """A model folder problem, with a one-line explanation of the fix."""


class ConfigMismatchWarning(UserWarning):
    """config.json differs from the configuration the weights were exported with."""


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32" / "bf16" / "fp16", the names config.json and the command lines use."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def folder_config(
    kind: str, flavor: str | None, args: RATModelArgs, dtype: torch.dtype, add_bos: bool = True
) -> dict:
    """The contents of config.json. ``add_bos``: the training data put a BOS token before each
    document, so text prompts get one (the paper's code trains without: EOS after each
    document only)."""
    return {
        "model_kind": kind,
        "flavor": flavor,
        "dtype": dtype_name(dtype),
        "add_bos": add_bos,
        "args": dataclasses.asdict(args),
    }


def config_record(config: dict) -> str:
    return json.dumps({k: config.get(k) for k in ("model_kind", "flavor", "args")}, sort_keys=True)


def config_edits(config: dict, record: str) -> list[str]:
    """``field=now (exported with then)`` for every configuration field that differs."""

    def fields(c: dict) -> dict:
        return {"model_kind": c.get("model_kind"), "flavor": c.get("flavor"), **c.get("args", {})}

    now, exported = fields(config), fields(json.loads(record))
    return [
        f"{k}={now.get(k)!r} (exported with {exported.get(k)!r})"
        for k in sorted(now.keys() | exported.keys()) if now.get(k) != exported.get(k)
    ]


def warn_config_edits(config: dict, record: str | None, config_path, stacklevel: int) -> None:
    """A ConfigMismatchWarning naming every field of ``config`` (config.json contents in the
    ``folder_config`` layout) that differs from the exported ``record``, if any."""
    edits = config_edits(config, record) if record else []
    if edits:
        warnings.warn(
            f"{config_path} was edited after export: {', '.join(edits)}; the model may compute "
            "garbage: restore those values or convert the checkpoint again",
            ConfigMismatchWarning,
            stacklevel=stacklevel + 1,
        )


def read_config(model_dir: str | os.PathLike) -> tuple[dict, RATModelArgs]:
    """(config.json contents, RATModelArgs) of a model folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist: create it with tools/convert_checkpoint.py"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no {CONFIG_FILE}: is it a converted model folder?")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path} is invalid ({err}): convert the checkpoint again") from None
    if isinstance(config, dict) and "model_type" in config and "args" not in config:
        raise ModelFolderError(
            f"{folder} is a transformers folder (model_type {config['model_type']!r}), not "
            "a standalone one: load it with AutoModelForCausalLM after `import "
            "rat_plugin.hf`, or use the folder it was exported from"
        )
    return config, checked_config(config, path)


def checked_config(config, where) -> RATModelArgs:
    """The RATModelArgs of ``folder_config`` contents read from ``where``, its fields checked."""
    try:
        if not isinstance(config, dict):
            raise ValueError(f"it holds {type(config).__name__} {config!r:.40}, not an object")
        args = RATModelArgs(**config["args"])
        if not isinstance(config.get("add_bos", True), bool):
            raise ValueError(f"add_bos={config['add_bos']!r} must be true or false")
        dtype = config.get("dtype", "fp32")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        if config.get("model_kind") not in MODEL_KINDS:
            raise ValueError(f"model_kind={config.get('model_kind')!r} is not one of "
                             f"{sorted(MODEL_KINDS)}")
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{where} is invalid ({err}): convert the checkpoint again") \
            from None
    return args


def listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def expected_shapes(args: RATModelArgs) -> dict[str, torch.Size]:
    """Parameter name -> shape of the model ``args`` describe (built on the meta device)."""
    with torch.device("meta"):
        model = RATModel(args)
    return {k: v.shape for k, v in model.state_dict().items()}


def shape_problems(args: RATModelArgs, shapes: dict[str, torch.Size]) -> str | None:
    """Unknown, missing (the tied head may be absent) and mis-shaped weights of ``shapes``
    against the model of ``args``, in one line; None when they fit."""
    expected = expected_shapes(args)
    missing = [k for k in expected if k not in shapes and k != TIED_HEAD]
    unknown = [k for k in shapes if k not in expected]
    wrong = [
        f"{k} {tuple(shapes[k])} != {tuple(v)}"
        for k, v in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(v)
    ]
    problems = []
    if unknown:
        problems.append(f"unknown keys: {listing(unknown)}")
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if wrong:
        problems.append(f"shape mismatches (weights != model): {listing(wrong, 6)}")
    return "; ".join(problems) or None


def weight_problem(state: dict[str, torch.Tensor]) -> str | None:
    """The first non-finite or absurd (|w| > MAX_ABS_WEIGHT) weight of ``state``, described
    with its name, value and position; None when all are sane."""
    names = [k for k, v in state.items() if v.numel()]
    if not names:
        return None
    extremes = torch.stack([torch.stack(torch.aminmax(state[k].detach())).float() for k in names])
    largest = extremes.abs().amax(dim=1).tolist()  # one host sync for all tensors
    for name, value in zip(names, largest):
        if not value <= MAX_ABS_WEIGHT:  # NaN fails every comparison
            tensor = state[name].detach()
            bad = ~torch.isfinite(tensor) | (tensor.abs() > MAX_ABS_WEIGHT)
            where = [int(i) for i in bad.nonzero()[0]]
            found = float(tensor[tuple(where)])
            kind = "an absurd" if math.isfinite(found) else "a non-finite"
            return (
                f"{name} holds {kind} weight {found:g} at {where} (weights must be finite and "
                f"within +-{MAX_ABS_WEIGHT:g})"
            )
    return None


# Hugging Face layout (rat_plugin.hf's RATForCausalLM and the trainer's HF checkpoints): the
# RATModel is the wrapper's ``model``, so every name gets this prefix; the tied head is stored
# once, as the embedding.
HF_PREFIX = "model."


def to_hf_names(state: dict) -> dict:
    return {HF_PREFIX + k: v for k, v in state.items() if k != TIED_HEAD}


def from_hf_names(hf_state: dict) -> dict:
    """RATModel names (the tied head included, as torchtitan's model state has it)."""
    state = {k.removeprefix(HF_PREFIX): v for k, v in hf_state.items()}
    if EMBEDDING in state:
        state[TIED_HEAD] = state[EMBEDDING]
    return state

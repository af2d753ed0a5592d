"""Load a standalone model folder (config.json + model.safetensors [+ tokenizer.json])."""

import json
import math
import os
import warnings
from pathlib import Path

import torch

from rat_plugin.data.tokenizer import (
    TOKENIZER_FILE,
    TokenizerFileError,
    read_tokenizer,
    read_tokenizer_config,
)
from rat_plugin.generate.arguments import resolve_device, resolve_dtype
from rat_plugin.model import RATModel, RATModelArgs

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_HEAD = "output.weight"
# Trained LM weights stay far below this (RMSNorm gains and outlier features are in the tens):
# beyond it a weight is corruption. It also keeps every weight finite in fp16 (max 65504).
MAX_ABS_WEIGHT = 1e4


class ModelFolderError(ValueError):
    """A model folder problem, with a one-line explanation of the fix."""


class ConfigMismatchWarning(UserWarning):
    """config.json differs from the configuration the weights were exported with."""


# model.safetensors metadata key holding the configuration the converter exported the weights
# with: chunk size, window and RoPE base leave no trace in the shapes, so edits to them in
# config.json can only be detected against this record.
CONFIG_RECORD = "rat_config"


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
        args = RATModelArgs(**config["args"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{path} is invalid ({err}): convert the checkpoint again") from None
    return config, args


def load(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> RATModel:
    """The model of a converted folder, in eval mode, on ``device``.

    ``dtype`` (torch dtype or "fp32" / "bf16" / "fp16") defaults to the stored one. The
    safetensors file is memory-mapped; the model is built on the meta device and takes the
    loaded tensors as its parameters, so no random init is spent. Non-finite or absurd weights
    are refused (ModelFolderError naming the tensor); a config.json edited since the export
    gives a ConfigMismatchWarning naming the fields.
    """
    from safetensors.torch import load_file

    config, args = read_config(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFolderError(f"{model_dir} has no {WEIGHTS_FILE}: convert the checkpoint again")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype) or resolve_dtype(config.get("dtype", "fp32"), "config.json dtype")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as err:
        raise ModelFolderError(
            f"cannot read {weights} ({err}): convert the checkpoint again"
        ) from None
    with torch.device("meta"):
        model = RATModel(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state and k != TIED_HEAD)
    unknown = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k])
    if missing or unknown or wrong:
        raise ModelFolderError(
            f"{weights} does not fit {CONFIG_FILE} (missing {missing[:5]}, unknown {unknown[:5]}, "
            f"mis-shaped {wrong[:5]}): convert the checkpoint again"
        )
    problem = weight_problem(state)
    if problem:
        raise ModelFolderError(
            f"{weights}: {problem}: the file is corrupt; export it again from a good checkpoint"
        )
    warn_config_edits(config, weights)
    state = {k: v.to(dtype) for k, v in state.items() if k != TIED_HEAD}
    model.load_state_dict(state, strict=False, assign=True)
    model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False)
    model.config = config
    return model.eval()


def warn_config_edits(config: dict, weights: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        record = (f.metadata() or {}).get(CONFIG_RECORD)
    edits = config_edits(config, record) if record else []
    if edits:
        warnings.warn(
            f"{weights.parent / CONFIG_FILE} was edited after export: {', '.join(edits)}; the "
            "model may compute garbage: restore those values or convert the checkpoint again",
            ConfigMismatchWarning,
            stacklevel=3,
        )


def load_tokenizer(model_dir: str | os.PathLike):
    """The HF ``tokenizers.Tokenizer`` copied into the folder by the converter."""
    if not (Path(model_dir) / TOKENIZER_FILE).is_file():
        raise ModelFolderError(
            f"{model_dir} has no {TOKENIZER_FILE}: convert with --tokenizer DIR, or pass token ids "
            "(--prompt-ids) instead of text"
        )
    try:
        return read_tokenizer(model_dir)
    except TokenizerFileError as err:
        raise ModelFolderError(f"{err}: convert again with --tokenizer DIR") from None


def special_token_ids(model_dir: str | os.PathLike, tokenizer) -> tuple[int | None, int | None]:
    """(bos id, eos id) named by tokenizer_config.json, None where absent."""
    try:
        config = read_tokenizer_config(model_dir)
    except TokenizerFileError as err:
        raise ModelFolderError(f"{err}: fix it or convert again with --tokenizer DIR") from None

    def token_id(name: str) -> int | None:
        token = config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        return tokenizer.token_to_id(token) if isinstance(token, str) else None

    return token_id("bos_token"), token_id("eos_token")

"""Load a standalone model folder (config.json + model.safetensors [+ tokenizer.json])."""

import os
from pathlib import Path

import torch

from rat_plugin.data.tokenizer import (
    TOKENIZER_FILE,
    TokenizerFileError,
    read_tokenizer,
    read_tokenizer_config,
)
from rat_plugin.folder import (
    CONFIG_FILE,
    CONFIG_RECORD,
    TIED_HEAD,
    WEIGHTS_FILE,
    ConfigMismatchWarning,  # noqa: F401  (re-exported: load() warns with it)
    ModelFolderError,
    read_config,
    shape_problems,
    warn_config_edits,
    weight_problem,
)
from rat_plugin.generate.arguments import resolve_device, resolve_dtype
from rat_plugin.model import RATModel


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
    problems = shape_problems(args, {k: v.shape for k, v in state.items()})
    if problems:
        raise ModelFolderError(
            f"{weights} does not fit {CONFIG_FILE} ({problems}): convert the checkpoint again"
        )
    problem = weight_problem(state)
    if problem:
        raise ModelFolderError(
            f"{weights}: {problem}: the file is corrupt; export it again from a good checkpoint"
        )
    warn_config_edits(config, exported_record(weights), weights.parent / CONFIG_FILE, 2)
    with torch.device("meta"):
        model = RATModel(args)
    state = {k: v.to(dtype) for k, v in state.items() if k != TIED_HEAD}
    model.load_state_dict(state, strict=False, assign=True)
    model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False)
    model.config = config
    return model.eval()


def exported_record(weights: Path) -> str | None:
    """The configuration the converter recorded in the metadata of ``weights``."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return (f.metadata() or {}).get(CONFIG_RECORD)


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

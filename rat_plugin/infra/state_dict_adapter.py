"""torchtitan's Hugging Face checkpoint path for RAT models: ``[checkpoint] last_save_in_hf``
writes safetensors in ``rat_plugin.hf``'s layout, ``initial_load_in_hf`` reads them back.

torchtitan writes an HF save's weights only (shards and their index); ``complete_hf_saves``
makes the plugin add what a transformers folder needs beside them (``RATStateDictAdapter
.complete``), so the last save loads with ``AutoModelForCausalLM.from_pretrained`` as a
``--to-hf`` export does.
"""

import dataclasses
import functools
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.protocols.state_dict_adapter import BaseStateDictAdapter
from torchtitan.tools.logging import logger

from rat_plugin.data.tokenizer import TOKENIZER_FILE
from rat_plugin.folder import from_hf_names, to_hf_names
from rat_plugin.infra import ConfigError
from rat_plugin.model import FLAVORS, MODEL_KINDS, RATModelArgs, make_args

SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_groups", "vocab_size", "ffn_hidden_dim")


class RATStateDictAdapter(BaseStateDictAdapter):
    """RATModel names <-> ``model.<name>`` (``RATForCausalLM``'s), the tied head stored once.

    The names map one to one, with no weight reshaped, so DTensor shards (FSDP, TP) pass
    through. All weights go to one consolidated safetensors file (no shard index), and
    ``hf_assets_path`` (the tokenizer folder) is where ``initial_load_in_hf`` reads when no
    ``initial_load_path`` is given.
    """

    def __init__(self, model_args: RATModelArgs, hf_assets_path: str | None):
        self.model_args = model_args
        self.hf_assets_path = hf_assets_path
        self.fqn_to_index_mapping = None

    def to_hf(self, state_dict: dict) -> dict:
        return to_hf_names(state_dict)

    def from_hf(self, hf_state_dict: dict) -> dict:
        return from_hf_names(hf_state_dict)

    def get_hf_storage_reader(
        self, path: str, from_quantized: bool = False
    ) -> HuggingFaceStorageReader:
        if from_quantized:
            raise ConfigError(
                "[checkpoint] initial_load_in_hf_quantized: RAT checkpoints are not quantized; "
                "set it to false"
            )
        return HuggingFaceStorageReader(path)

    def complete(self, folder: str, dtype: torch.dtype) -> None:
        """Write config.json (the trained model's args, kernels back to auto), the generated
        code and the tokenizer of ``hf_assets_path`` beside the HF save in ``folder``, whose
        weights are in ``dtype``. The data had a BOS before each document (``add_bos``)."""
        try:
            from rat_plugin.hf.configuration import RATConfig
            from rat_plugin.hf.export import complete_hf_save
        except ImportError as err:  # transformers, the hf extra, is missing
            logger.warning(f"checkpoint: {folder} holds the weights only ({err}): install the "
                           "hf extra to make it a transformers folder")
            return
        from rat_plugin.generate.loading import load_tokenizer, special_token_ids

        args = self.model_args
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(RATModelArgs)}
        fields.update(scan_kernel="auto", attention_kernel="auto")
        kind = next(k for k, v in MODEL_KINDS.items()
                    if v["mixer"] == args.mixer and (v["swa_window"] is None) == (
                        args.swa_window is None))
        flavor = next((f for f in FLAVORS if all(
            getattr(make_args(kind, f), n) == getattr(args, n) for n in SHAPE_FIELDS)), None)
        tokenizer_dir = self.hf_assets_path
        if not tokenizer_dir or not os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILE)):
            tokenizer_dir, (bos, eos) = None, (None, None)
        else:
            bos, eos = special_token_ids(tokenizer_dir, load_tokenizer(tokenizer_dir))
        config = RATConfig(model_kind=kind, flavor=flavor, add_bos=True, dtype=dtype,
                           bos_token_id=bos, eos_token_id=eos, **fields)
        try:
            complete_hf_save(Path(folder), config, tokenizer_dir, log=logger.info)
        except (OSError, ValueError) as err:  # the weights are saved: say what is missing
            logger.warning(f"checkpoint: {folder} holds the weights only, writing its "
                           f"transformers files failed ({err})")
            return
        logger.info(f"checkpoint: {folder} is a transformers folder (AutoModelForCausalLM"
                    ".from_pretrained, trust_remote_code=True where rat_plugin is not installed)")


def complete_hf_saves() -> None:
    """Make torchtitan's ``CheckpointManager.dcp_save`` complete every HF save of a RAT model
    (``RATStateDictAdapter.complete``, on the first rank) once its weights are written. Applied
    once, at plugin import; other models' saves are left as they are."""
    save = CheckpointManager.dcp_save
    if getattr(save, "completes_rat_hf_saves", False):
        return

    @functools.wraps(save)
    def dcp_save(self, state_dict, checkpoint_id, *args, to_hf: bool = False, **kwargs):
        result = save(self, state_dict, checkpoint_id, *args, to_hf=to_hf, **kwargs)
        first_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if to_hf and first_rank and isinstance(self.sd_adapter, RATStateDictAdapter):
            self.sd_adapter.complete(checkpoint_id, self.export_dtype)
        return result

    dcp_save.completes_rat_hf_saves = True
    CheckpointManager.dcp_save = dcp_save

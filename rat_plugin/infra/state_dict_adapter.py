"""torchtitan's Hugging Face checkpoint path for RAT models: ``[checkpoint] last_save_in_hf``
writes safetensors in ``rat_plugin.hf``'s layout, ``initial_load_in_hf`` reads them back."""

from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.protocols.state_dict_adapter import BaseStateDictAdapter

from rat_plugin.folder import from_hf_names, to_hf_names
from rat_plugin.infra import ConfigError
from rat_plugin.model import RATModelArgs


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

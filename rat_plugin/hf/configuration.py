"""RATConfig: the model configuration as a transformers ``PreTrainedConfig``."""

import dataclasses

from transformers import PreTrainedConfig

from rat_plugin.model import RATModelArgs

ARG_FIELDS = tuple(f.name for f in dataclasses.fields(RATModelArgs))


class RATConfig(PreTrainedConfig):
    """Every ``RATModelArgs`` field, the model kind and flavor, and the data convention
    (``add_bos``: the training data put a BOS token before each document)."""

    model_type = "rat"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
    }

    model_kind: str = "rat"
    flavor: str | None = None
    add_bos: bool = True
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_groups: int = 2
    chunk_size: int = 16
    vocab_size: int = 32000
    ffn_hidden_dim: int = 8192
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    max_seq_len: int = 4096
    mixer: str = "rat"
    swa_window: int | None = None
    scan_kernel: str = "auto"
    attention_kernel: str = "auto"
    tie_word_embeddings: bool = True
    use_cache: bool = True  # forward() returns the decoding cache (past_key_values)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.to_args()  # a ValueError naming the bad field

    def to_args(self) -> RATModelArgs:
        return RATModelArgs(**{name: getattr(self, name) for name in ARG_FIELDS})

    @classmethod
    def from_folder_config(cls, config: dict, **kwargs) -> "RATConfig":
        """From the contents of a standalone folder's config.json."""
        return cls(model_kind=config["model_kind"], flavor=config.get("flavor"),
                   add_bos=config.get("add_bos", True), **config["args"], **kwargs)

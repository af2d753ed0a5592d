"""RATConfig: the model configuration as a transformers ``PreTrainedConfig``."""

import dataclasses

import torch
from transformers import PreTrainedConfig

from rat_plugin.folder import DTYPES
from rat_plugin.model import RATModelArgs

ARG_FIELDS = tuple(f.name for f in dataclasses.fields(RATModelArgs))


class RATConfig(PreTrainedConfig):
    """Every ``RATModelArgs`` field, the model kind and flavor, and the data convention
    (``add_bos``: the training data put a BOS token before each document). ``dtype`` may be
    named as in our folders (fp32, bf16, fp16) or as in torch (float32, ...)."""

    model_type = "rat"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",  # the training length (lm_eval's max_length)
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
        self.dtype = model_dtype(self.dtype)
        if "torch_dtype" in kwargs:
            kwargs["torch_dtype"] = model_dtype(kwargs["torch_dtype"])
        super().__post_init__(**kwargs)
        self.to_args()  # a ValueError naming the bad field

    def to_args(self) -> RATModelArgs:
        return RATModelArgs(**{name: getattr(self, name) for name in ARG_FIELDS})

    def folder_config(self) -> dict:
        """The model fields as a standalone folder's config.json holds them."""
        return {"model_kind": self.model_kind, "flavor": self.flavor,
                "args": dataclasses.asdict(self.to_args())}

    @classmethod
    def from_folder_config(cls, config: dict, **kwargs) -> "RATConfig":
        """From the contents of a standalone folder's config.json."""
        return cls(model_kind=config["model_kind"], flavor=config.get("flavor"),
                   add_bos=config.get("add_bos", True), **config["args"], **kwargs)


def model_dtype(value):
    """A dtype given by name (ours or torch's) as the torch dtype; others as they are."""
    if not isinstance(value, str):
        return value
    if value in DTYPES:
        return DTYPES[value]
    if isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ValueError(f"dtype={value!r} is not a model dtype: use one of "
                     f"{', '.join(sorted(DTYPES))} (or torch's name, e.g. bfloat16)")

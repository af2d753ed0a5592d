"""RAT models in plain PyTorch (no torchtitan import)."""

from rat_plugin.model.args import FLAVORS, MODEL_KINDS, RATModelArgs, make_args
from rat_plugin.model.cache import KVCache, RATCache
from rat_plugin.model.model import RATModel, TransformerBlock
from rat_plugin.model.rat import RAT
from rat_plugin.model.swa import SlidingWindowAttention

__all__ = [
    "FLAVORS",
    "KVCache",
    "MODEL_KINDS",
    "RAT",
    "RATCache",
    "RATModel",
    "RATModelArgs",
    "SlidingWindowAttention",
    "TransformerBlock",
    "make_args",
]

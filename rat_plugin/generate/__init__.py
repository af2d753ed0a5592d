"""Standalone generation from a converted RAT model folder (no torchtitan, no distributed).

    model = load("rat_model", device="cuda", dtype="bf16")
    result = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=64, temperature=0.8, top_p=0.9)
"""

from rat_plugin.generate.decode import GenerationResult, GenerationStats, generate
from rat_plugin.generate.loading import (
    ConfigMismatchWarning,
    ModelFolderError,
    load,
    load_tokenizer,
)
from rat_plugin.generate.memory import cache_bytes, layer_cache_bytes

__all__ = [
    "ConfigMismatchWarning",
    "GenerationResult",
    "GenerationStats",
    "ModelFolderError",
    "cache_bytes",
    "generate",
    "layer_cache_bytes",
    "load",
    "load_tokenizer",
]

"""Mixing kernels: plain-PyTorch reference paths (and GPU fast paths with the same contract)."""

from rat_plugin.ops.chunk_attention import chunk_attention
from rat_plugin.ops.chunk_scan import chunk_scan
from rat_plugin.ops.mixing import rat_mixing, rat_mixing_with_states
from rat_plugin.ops.rope import apply_rope, rope_angles

__all__ = [
    "apply_rope",
    "chunk_attention",
    "chunk_scan",
    "rat_mixing",
    "rat_mixing_with_states",
    "rope_angles",
]

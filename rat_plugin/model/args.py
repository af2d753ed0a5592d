"""Model configuration: a typed dataclass, the four model kinds and the size flavors."""

import math
from dataclasses import dataclass

from rat_plugin.ops.dispatch import ATTENTION_KERNELS, SCAN_KERNELS, check_choice

MIXERS = ("rat", "attention")
INT_FIELDS = (
    "dim", "n_layers", "n_heads", "n_groups", "chunk_size", "vocab_size", "ffn_hidden_dim",
    "max_seq_len",
)


@dataclass
class RATModelArgs:
    """Shape of a RAT / RAT-SWA / attention language model (docs/design.md sections 1-2).

    Layer i uses ``mixer`` unless ``swa_window`` is set and i is odd, in which case it is
    sliding-window attention with that window. ``scan_kernel`` and ``attention_kernel`` choose
    the implementations, not the math (``rat_plugin.ops.dispatch``).
    """

    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_groups: int = 2  # G: RAT query/key groups, head h uses group h mod G
    chunk_size: int = 16  # L
    vocab_size: int = 32000
    ffn_hidden_dim: int = 8192
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    max_seq_len: int = 4096  # training sequence length (decoding is not capped by it)
    mixer: str = "rat"  # "rat" or "attention" (full causal attention, the baseline)
    swa_window: int | None = None  # odd layers are SWA with this window when set
    scan_kernel: str = "auto"  # auto | torch | triton | triton_autotune
    attention_kernel: str = "auto"  # auto | torch | flex | flex_bf16

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def layer_mixer(self, layer_id: int) -> str:
        """"rat", "attention" or "swa" for layer ``layer_id``."""
        if self.swa_window is not None and layer_id % 2 == 1:
            return "swa"
        return self.mixer

    def validate(self) -> None:
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer")
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < math.inf:
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        self.scan_kernel = check_choice("scan_kernel", self.scan_kernel, SCAN_KERNELS)
        self.attention_kernel = check_choice(
            "attention_kernel", self.attention_kernel, ATTENTION_KERNELS
        )
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer={self.mixer!r} is unknown: use one of {MIXERS}")
        for name in ("dim", "n_layers", "n_heads", "n_groups", "vocab_size", "ffn_hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1 (the paper uses 16)")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                "choose n_heads dividing dim"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_groups:
            raise ValueError(
                f"n_groups={self.n_groups} does not divide n_heads={self.n_heads}: "
                "choose G with n_heads % G == 0"
            )
        if self.swa_window is not None and (
            not isinstance(self.swa_window, int) or self.swa_window < 1
        ):
            raise ValueError(
                f"swa_window={self.swa_window} must be >= 1 (or None for no SWA layers)"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """Training needs a positive length, of whole chunks when any layer is RAT."""
        if seq_len < 1:
            raise ValueError(
                f"seq_len={seq_len} must be a positive number of tokens, e.g. {self.max_seq_len}"
            )
        if self.mixer == "rat" and seq_len % self.chunk_size:
            lower = seq_len - seq_len % self.chunk_size
            raise ValueError(
                f"seq_len={seq_len} is not a multiple of chunk_size={self.chunk_size}: "
                f"use seq_len={lower or self.chunk_size} or {lower + self.chunk_size}"
            )


# Model kinds: which mixer the even layers use and whether odd layers are SWA.
MODEL_KINDS: dict[str, dict] = {
    "rat": dict(mixer="rat", swa_window=None),
    "rat_swa": dict(mixer="rat", swa_window=1024),
    "rat_attn": dict(mixer="attention", swa_window=None),  # baseline for `rat`
    "rat_attn_swa": dict(mixer="attention", swa_window=1024),  # baseline for `rat_swa`
}

# Sizes. 7B/13B follow Llama-2 widths with d=128 and H/G = 8 as in the 1.3B model.
FLAVORS: dict[str, dict] = {
    "debugmodel": dict(
        dim=128, n_layers=4, n_heads=4, n_groups=2, chunk_size=16, vocab_size=2048,
        ffn_hidden_dim=512, max_seq_len=256, swa_window=64,
    ),
    "1.3B": dict(
        dim=2048, n_layers=24, n_heads=16, n_groups=2, ffn_hidden_dim=8192, max_seq_len=4096,
    ),
    "7B": dict(
        dim=4096, n_layers=32, n_heads=32, n_groups=4, ffn_hidden_dim=16384, max_seq_len=4096,
    ),
    "13B": dict(
        dim=5120, n_layers=40, n_heads=40, n_groups=5, ffn_hidden_dim=20480, max_seq_len=4096,
    ),
}


def make_args(kind: str, flavor: str, **overrides) -> RATModelArgs:
    """Args for model ``kind`` (see MODEL_KINDS) at size ``flavor`` (see FLAVORS)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: choose one of {sorted(MODEL_KINDS)}")
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}: choose one of {list(FLAVORS)}")
    has_swa = MODEL_KINDS[kind]["swa_window"] is not None
    if "swa_window" in overrides and (overrides["swa_window"] is not None) != has_swa:
        raise ValueError(
            f"swa_window={overrides['swa_window']} would change model kind {kind!r}: "
            "sliding-window layers are what rat_swa / rat_attn_swa add, so set a window only "
            "for those kinds (and pick rat / rat_attn for none)"
        )
    fields = dict(FLAVORS[flavor])
    window = fields.pop("swa_window", None)
    fields.update(MODEL_KINDS[kind])
    if fields["swa_window"] is not None and window is not None:
        fields["swa_window"] = window
    fields.update(overrides)
    return RATModelArgs(**fields)


def all_flavors(kind: str) -> dict[str, RATModelArgs]:
    return {flavor: make_args(kind, flavor) for flavor in FLAVORS}

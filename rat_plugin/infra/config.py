"""The plugin's own TOML section, ``[rat]``: add ``[job] custom_config_module =
"rat_plugin.infra.config"`` to a config (every shipped one has it) to set it in the TOML or as
``--rat.<field>`` on the command line."""

from dataclasses import dataclass, field


@dataclass
class RATConfig:
    scan_kernel: str = "auto"
    """Intra-chunk scan: auto (the Triton custom op on CUDA, the portable scan elsewhere),
    torch, triton, or triton_autotune (autotuned block width and warps; unmeasured). The
    environment variable RAT_KERNELS overrides it."""

    attention_kernel: str = "auto"
    """Attention over chunk summaries and SWA windows: auto (flex_attention on CUDA with the
    Triton scan, the portable kernels elsewhere), torch, flex, or flex_bf16 (flex over bf16
    queries and summaries, the merge in fp32; unmeasured). RAT_ATTENTION overrides it."""

    document_aware: bool = False
    """Pack every document on a chunk boundary and mask across documents, so each packed
    document is computed as if it were alone (docs/design.md section 7)."""


@dataclass
class JobConfig:
    rat: RATConfig = field(default_factory=RATConfig)

"""The plugin's own TOML sections, ``[rat]`` and ``[sft]``: add ``[job] custom_config_module =
"rat_plugin.infra.config"`` to a config (every shipped one has it) to set it in the TOML or as
``--rat.<field>`` / ``--sft.<field>`` on the command line."""

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
class SFTConfig:
    """Instruction data (``[training] dataset = "sft"`` or ``"rat_longqa"``, and their
    ``_validation`` splits): how records become prompts and answers (docs/sft.md)."""

    template: str = ""
    """The prompt: a name of rat_plugin/data/templates.py (narrativeqa, qmsum, wikisum,
    rat_longqa) or a template string over the records' fields, e.g.
    "Transcript: {input}\\n\\nQuestion: {prompt}\\n\\nAnswer:". Empty: the dataset's own
    (rat_longqa's)."""

    answer_field: str = "answers"
    """The record field holding the answer: a string, or a list of reference answers (each
    one a training example)."""

    bos: bool = True
    """Start every example with the tokenizer's BOS token, as torchtitan's pretraining starts
    every document; false for a model imported from the paper's code (trained without)."""


@dataclass
class JobConfig:
    rat: RATConfig = field(default_factory=RATConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

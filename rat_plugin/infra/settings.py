"""torchtitan settings that would train RAT wrongly, or fail only after training started, checked
when the trainer hands the job to the model args (``update_from_config``), before anything is
built. One completed instead: float8 keeps RAT's small and tied projections in high precision.
"""

import torchtitan.components.quantization.float8 as titan_float8
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from rat_plugin.infra import ConfigError, cpu
from rat_plugin.infra.float8 import FLOAT8_FILTER_FQNS

FLOAT8_CONVERTER = "quantize.linear.float8"


def compiles_model(job_config: JobConfig) -> bool:
    """Whether torchtitan compiles the model's blocks (``[compile]`` with "model")."""
    return job_config.compile.enable and "model" in job_config.compile.components


def check_settings(job_config: JobConfig, mixer: str, chunk_size: int) -> None:
    _check_clipping(job_config.training.max_norm)
    _check_loader_workers(job_config)
    _check_context_parallel(job_config, mixer, chunk_size)
    _check_compile_dependent(job_config)
    if cpu.cpu_mode() and job_config.checkpoint.enable \
            and job_config.checkpoint.async_mode == "async_with_pinned_mem":
        raise ConfigError(
            "[checkpoint] async_mode='async_with_pinned_mem' needs CUDA (pinned host memory and "
            "non-blocking copies): on CPU ranks use 'async' or 'disabled'"
        )
    if FLOAT8_CONVERTER in job_config.model.converters:
        _complete_float8(job_config)


def _check_clipping(max_norm: float) -> None:
    if max_norm <= 0:
        effect = "zeroes" if max_norm == 0 else "reverses"
        raise ConfigError(
            f"[training] max_norm={max_norm}: torchtitan scales gradients by max_norm / norm, "
            f"so this {effect} them (it has no 'off' value): use a positive norm, or a large one "
            "such as 1e9 to clip nothing"
        )


def _check_loader_workers(job_config: JobConfig) -> None:
    """torchtitan's text dataset (and the document-aware packing built on it) ignores the loader
    worker it runs in: each of N workers reads the rank's whole share, so every batch comes N
    times, and the checkpointed data position is per worker."""
    sections = ["training"] + (["validation"] if job_config.validation.enable else [])
    for section in sections:
        workers = getattr(job_config, section).dataloader.num_workers
        if workers > 0:
            raise ConfigError(
                f"[{section}.dataloader] num_workers={workers}: the text datasets give every "
                f"loader worker this rank's whole share of the data, so each batch would be "
                f"read {workers} times: set num_workers = 0"
            )


def _check_context_parallel(job_config: JobConfig, mixer: str, chunk_size: int) -> None:
    parallelism = job_config.parallelism
    balancer = parallelism.context_parallel_load_balancer
    if isinstance(balancer, str) and balancer.strip().lower() in ("none", ""):
        parallelism.context_parallel_load_balancer = balancer = None  # TOML cannot say None
    if balancer not in (None, "headtail"):
        raise ConfigError(
            f"[parallelism] context_parallel_load_balancer={balancer!r}: RAT's context parallel "
            "splits sequences 'headtail' (the default) or contiguously ('None')"
        )
    cp = parallelism.context_parallel_degree
    if cp == 1 or mixer != "rat":
        return
    pieces = 2 * cp if balancer == "headtail" else cp
    sections = [("training", job_config.training.seq_len)]
    if job_config.validation.enable:
        sections.append(("validation", job_config.validation.seq_len))
    for section, seq_len in sections:
        if seq_len % (pieces * chunk_size):
            raise ConfigError(
                f"[{section}] seq_len={seq_len} must split into {pieces} context-parallel pieces "
                f"of whole chunks: use a multiple of {pieces * chunk_size}"
            )


def _check_compile_dependent(job_config: JobConfig) -> None:
    """Settings torchtitan checks only while it builds the model (a traceback there)."""
    ac = job_config.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option != "op" \
            and not (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) >= 1):
        raise ConfigError(
            f"[activation_checkpoint] selective_ac_option={ac.selective_ac_option!r}: give 'op' "
            "(save matmuls and attention) or N >= 1 (checkpoint every N-th block)"
        )
    compiled = compiles_model(job_config)
    if ac.mode == "memory_budget" and not compiled:
        raise ConfigError(
            "[activation_checkpoint] mode='memory_budget' is a compiler pass: set [compile] "
            "enable = true with 'model' in components, or use mode 'selective'"
        )
    parallelism = job_config.parallelism
    if parallelism.enable_async_tensor_parallel and parallelism.tensor_parallel_degree > 1 \
            and (not compiled or cpu.cpu_mode()):
        raise ConfigError(
            "[parallelism] enable_async_tensor_parallel needs compiled blocks on CUDA ([compile] "
            "enable = true with 'model' in components; not on CPU ranks): set it to false"
        )


def _complete_float8(job_config: JobConfig) -> None:
    if cpu.cpu_mode() and job_config.parallelism.tensor_parallel_degree > 1:
        raise ConfigError(
            f"[model] converters={FLOAT8_CONVERTER!r} with tensor_parallel_degree > 1 cannot run "
            "on CPU ranks (gloo has no float8 collectives): drop one of them here; on GPUs the "
            "combination is untested"
        )
    float8 = job_config.quantize.linear.float8
    # torchtitan's own condition (looked up now: the dry run lifts the GPU check).
    if not titan_float8.has_cuda_capability(8, 9) \
            and not (float8.emulate and not compiles_model(job_config)):
        raise ConfigError(
            f"[model] converters={FLOAT8_CONVERTER!r} needs an SM89+ GPU, or "
            "--quantize.linear.float8.emulate without compiled blocks (torchao's float8 matmuls "
            "run on CPU ranks either way; the flag gets past torchtitan's GPU check)"
        )
    missing = [fqn for fqn in FLOAT8_FILTER_FQNS if fqn not in float8.filter_fqns]
    if missing:
        float8.filter_fqns = [*float8.filter_fqns, *missing]
        logger.info(f"float8: keeping {', '.join(missing)} in high precision (filter_fqns is now "
                    f"{float8.filter_fqns})")

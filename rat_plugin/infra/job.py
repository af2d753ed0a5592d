"""Checks of the launched job that torchtitan settles before any plugin code runs.

The trainer imports the plugin (``[experimental] custom_import``) after parsing the job and
before looking up its train spec, so a missing or unknown ``[model] name`` (torchtitan then
builds llama3, or says only "not registered") can be caught here, at import: the job is the
trainer's own command line, parsed again. So can settings that fail before the model args see
the job (``infra/settings.py`` checks the rest), and torchrun's launch: restarts on the store
torchrun's agent shares are warned of. Outside a trainer process nothing is checked.
"""

import os
import sys

from torchtitan.config import ConfigManager, JobConfig
from torchtitan.config.job_config import Model
from torchtitan.tools.logging import logger

from rat_plugin.infra import ConfigError, cpu
from rat_plugin.model.args import MODEL_KINDS

TRAINER_MODULES = ("torchtitan.train", "rat_plugin.train")


def launched_job() -> JobConfig | None:
    """The job of the trainer process importing the plugin; None in any other process."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(main_spec, "name", None) not in TRAINER_MODULES:
        return None
    return ConfigManager().parse_args(sys.argv[1:])


def check_model_name(job_config: JobConfig) -> None:
    name = job_config.model.name
    if name in MODEL_KINDS:
        return
    unset = " (torchtitan's default: [model] name is not set)" if name == Model.name else ""
    raise ConfigError(
        f"[model] name={name!r}{unset} is not a RAT model: set it to one of "
        f"{sorted(MODEL_KINDS)} (--model.name), or drop custom_import = "
        '"rat_plugin.train_spec" to train other models'
    )


def check_restarts() -> None:
    """Warn (rank 0) when torchrun may restart the job on the store its agent lends the ranks:
    torch 2.13 keeps that store across restarts, and restarted ranks can read the last
    attempt's addresses (gloo: connectFullMesh ... Connection refused)."""
    env = os.environ
    if env.get("RANK") == "0" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 \
            and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        logger.warning(
            f"torchrun --max-restarts={env['TORCHELASTIC_MAX_RESTARTS']} with its agent's store "
            "shared with the ranks: a restart may connect to the last attempt's dead ranks; "
            "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README, Multi-node)"
        )


def check_launch(job_config: JobConfig) -> None:
    """What the trainer would fail on deep inside, before update_from_config runs."""
    check_model_name(job_config)
    check_restarts()
    if job_config.parallelism.pipeline_parallel_degree > 1:
        raise ConfigError(
            f"[parallelism] pipeline_parallel_degree={job_config.parallelism.pipeline_parallel_degree}"
            ": RAT models have no pipeline plan; use data, tensor or context parallelism"
        )
    if cpu.cpu_mode() and job_config.training.enable_cpu_offload:
        raise ConfigError(
            "[training] enable_cpu_offload = true on CPU ranks: the weights are in host memory "
            "already; set it to false"
        )

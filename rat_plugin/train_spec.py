"""Register the RAT family with torchtitan 0.2.2 (import this module via
``[experimental] custom_import = "rat_plugin.train_spec"``).

TrainSpecs: ``rat`` (all RAT), ``rat_swa`` (RAT / sliding-window attention interleaved) and the
same-backbone attention baselines ``rat_attn`` (full causal attention) and ``rat_attn_swa``
(attention / SWA interleaved), each with flavors debugmodel, 1.3B, 7B, 13B, and a state-dict
adapter for checkpoints in Hugging Face format (``infra/state_dict_adapter.py``, which also makes
the HF last save a transformers folder). Importing also registers the local datasets, a
"float8" converter name that explains the real one, the one-line printing of the plugin's
errors (``infra/errors.py``) and of checkpoint saves that run out of space
(``infra/saving.py``), and (without a GPU) CPU/gloo mode (``infra/cpu.py``); in a trainer
process it then checks the job's ``[model] name`` (``infra/job.py``).
"""

import dataclasses
import os
import sys
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import (
    build_text_dataloader,
    build_text_validation_dataloader,
)
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.protocols.model_converter import (
    _registry_model_converter_cls,
    register_model_converter,
)
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec
from torchtitan.tools.logging import logger

from rat_plugin.data.datasets import (
    PREPARE_HINT,
    check_dataset_path,
    documents_problem,
    has_documents,
    register_datasets,
)
from rat_plugin.data.packing import DocumentPackedDataset
from rat_plugin.data.sft import SFT_DATASETS, InstructionPackedDataset, is_instruction_dataset
from rat_plugin.data.templates import TEMPLATES
from rat_plugin.data.tokenizer import (
    TOKENIZER_FILE,
    TokenizerFileError,
    read_tokenizer,
    read_tokenizer_config,
    vocab_end,
)
from rat_plugin.infra import ConfigError, cpu
from rat_plugin.infra.errors import one_line_excepthook
from rat_plugin.infra.guards import build_finite_loss, build_guarded_optimizers
from rat_plugin.infra.job import check_launch, launched_job
from rat_plugin.infra.parallelize import parallelize_rat
from rat_plugin.infra.resume import check_resume
from rat_plugin.infra.saving import explain_full_disk
from rat_plugin.infra.settings import check_settings
from rat_plugin.infra.validate import RATValidator
from rat_plugin.infra.state_dict_adapter import RATStateDictAdapter, complete_hf_saves
from rat_plugin.model.args import FLAVORS, MODEL_KINDS, RATModelArgs, make_args
from rat_plugin.model.model import RATModel
from rat_plugin.ops.dispatch import ATTENTION_ENV, KERNELS_ENV, select_kernels


@dataclasses.dataclass
class RATTitanArgs(RATModelArgs, BaseModelArgs):
    """RATModelArgs with torchtitan's model-args contract."""

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Take the training length from ``[training] seq_len`` and validate the job, the
        checkpoint it resumes from included (before torchtitan loads it)."""
        seq_len = job_config.training.seq_len
        try:
            self.check_seq_len(seq_len)
        except ValueError as e:
            raise ConfigError(f"[training] {e}") from None
        check_settings(job_config, self.mixer, self.chunk_size)
        self.max_seq_len = seq_len
        self.choose_kernels(job_config)
        path = job_config.model.hf_assets_path
        if os.path.exists(os.path.join(path, TOKENIZER_FILE)):
            end = vocab_end(checked_tokenizer(path))  # the largest id, not the entry count
            if end > self.vocab_size:
                raise ConfigError(
                    f"the tokenizer at [model] hf_assets_path={path} has token ids up to "
                    f"{end - 1} but the model's vocab_size is {self.vocab_size}: use the "
                    "model's tokenizer or a flavor with a larger vocabulary"
                )
        check_resume(job_config)

    def choose_kernels(self, job_config: JobConfig) -> None:
        """Resolve ``[rat] scan_kernel / attention_kernel`` (and their environment overrides)
        once for the trainer's device, and log the result (docs/design.md, "Kernel matrix")."""
        rat = getattr(job_config, "rat", None)  # absent without the custom_config_module
        if rat is not None:
            self.scan_kernel, self.attention_kernel = rat.scan_kernel, rat.attention_kernel
        device = "cuda" if not cpu.cpu_mode() or cpu.KERNELS_AS_ON_CUDA else "cpu"
        try:
            kernels = select_kernels(torch.device(device), self.scan_kernel, self.attention_kernel,
                                     self.head_dim)
        except ValueError as e:
            raise ConfigError(f"[rat] {e}") from None
        on_cpu = cpu.cpu_mode() and not cpu.KERNELS_AS_ON_CUDA
        if on_cpu and kernels.attention.startswith("flex"):
            raise ConfigError(
                f"[rat] attention_kernel={kernels.attention} cannot train on CPU ranks (torch "
                "has no flex_attention backward there): use auto or torch, or run the GPU "
                "program on CPU with tools/dry_run.py"
            )
        scan = "Triton custom op" if kernels.scan.startswith("triton") else "portable"
        if scan != "portable" and cpu.cpu_mode():
            scan += ", CPU body"
        attention = "flex_attention" if kernels.attention.startswith("flex") else "portable"
        sources = [f"[rat] scan_kernel={self.scan_kernel!r}, "
                   f"attention_kernel={self.attention_kernel!r}"]
        sources += [f"{e}={os.environ[e]}" for e in (KERNELS_ENV, ATTENTION_ENV) if e in os.environ]
        if cpu.KERNELS_AS_ON_CUDA:
            sources.append("dry run: auto as on CUDA")
        logger.info(
            f"RAT kernels: scan={kernels.scan} ({scan}), attention={kernels.attention} "
            f"({attention}); {'; '.join(sources)}"
        )
        self.scan_kernel, self.attention_kernel = kernels.scan, kernels.attention

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """(parameters, training FLOPs per token) with RAT's real mixing cost.

        Per token, forward + backward = 3 x forward and 2 FLOPs per multiply-add:
          6 * N                    N = non-embedding parameters (every linear of the blocks)
        + 6 * D * V                the LM head matmul (its weight is the tied embedding)
        + sum over layers of 12 * H * d * K_layer (+ 24 * D for a RAT layer's scan)
        where K_layer is the mean number of keys a query attends to over the T = seq_len
        positions (scores + weighted values = 2 matmuls of H*d per key):
          attention  K = (T + 1) / 2                      (causal)
          SWA        K = mean_t (min(t, W) + 1)           (window W)
          RAT        K = mean_t (t // L + 1)  ~ (T/L + 1) / 2   (earlier chunk summaries +
                                                                   the token's own state)
        and the RAT scan updates k~ and v~ (D channels each, ~4 FLOPs per channel).
        Elementwise gates, norms and RoPE are not counted (as in torchtitan's llama3).
        """
        nparams = sum(p.numel() for p in model.parameters())  # the tied weight counts once
        embedding = model.tok_embeddings.weight.numel()
        flops = 6 * (nparams - embedding) + 6 * self.dim * self.vocab_size
        for layer_id in range(self.n_layers):
            kind = self.layer_mixer(layer_id)
            flops += 12 * self.n_heads * self.head_dim * self.mean_keys(kind, seq_len)
            if kind == "rat":
                flops += 24 * self.dim
        return nparams, int(flops)

    def mean_keys(self, kind: str, seq_len: int) -> float:
        """Mean number of keys per query for a layer of ``kind`` at length ``seq_len``."""
        if kind == "attention":
            return (seq_len + 1) / 2
        if kind == "swa":
            return sum(min(t, self.swa_window) + 1 for t in range(seq_len)) / seq_len
        return sum(t // self.chunk_size + 1 for t in range(seq_len)) / seq_len


class Flavors(dict):
    """Flavor table whose unknown-key error lists the flavors."""

    def __init__(self, kind: str):
        super().__init__(
            {f: RATTitanArgs(**dataclasses.asdict(make_args(kind, f))) for f in FLAVORS}
        )
        self.kind = kind

    def __missing__(self, flavor: str):
        raise ConfigError(
            f"[model] flavor={flavor!r} is unknown for {self.kind}: choose one of {list(self)}"
        )


def checked_tokenizer(path: str):
    """The tokenizer of ``path``, its files checked before torchtitan reads them."""
    try:
        read_tokenizer_config(path)
        return read_tokenizer(path)
    except TokenizerFileError as err:
        raise ConfigError(
            f"[model] hf_assets_path: {err}: point it at the model's tokenizer"
        ) from None


def build_tokenizer(job_config: JobConfig):
    path = job_config.model.hf_assets_path
    if not os.path.exists(os.path.join(path, TOKENIZER_FILE)):
        hint = PREPARE_HINT if "assets/tokenizer" in path else "point it at the model's tokenizer"
        raise ConfigError(
            f"no tokenizer.json in {path!r}: set [model] hf_assets_path "
            f"(--model.hf_assets_path) or {hint}"
        )
    checked_tokenizer(path)
    return build_hf_tokenizer(job_config)


def build_dataloader(*, dp_world_size, dp_rank, tokenizer, job_config: JobConfig, **kwargs):
    """torchtitan's text dataloader, or with ``[rat] document_aware`` the document-aware
    packing (``rat_plugin.data.packing``); instruction data (``sft``, ``rat_longqa``) is
    always packed document-aware, answer-only (``rat_plugin.data.sft``). Every rank's share is
    checked to hold documents."""
    training = job_config.training
    check_dataset_path(training.dataset, training.dataset_path, "training")
    if is_instruction_dataset(training.dataset):
        build = partial(instruction_loader, job_config, "training", tokenizer, dp_rank,
                        dp_world_size, infinite=kwargs.get("infinite", True))
    elif not document_aware(job_config):
        build = partial(build_text_dataloader, dp_world_size, dp_rank, tokenizer, job_config,
                        **kwargs)
    else:
        build = partial(document_packed_loader, job_config, "training", tokenizer, dp_rank,
                        dp_world_size, infinite=kwargs.get("infinite", True))
    return with_documents(build, training, "training", dp_rank, dp_world_size)


def build_rat_validator(*, job_config: JobConfig, **kwargs):
    """RAT's validator; with ``[rat] document_aware`` (and on instruction data) it validates on
    documents packed as in training, so the held-out loss is that of each document alone, as it
    will be decoded."""
    validation = job_config.validation
    check_dataset_path(validation.dataset, validation.dataset_path, "validation")
    world = kwargs["dp_world_size"]
    if validation.steps == -1 and world > 1 and kwargs["parallel_dims"].fsdp_enabled:
        raise ConfigError(
            f"[validation] steps = -1 reads each of the {world} data-parallel "
            "ranks' share of the split to its end; the shares end after different numbers of "
            "batches, and under FSDP a rank that finishes waits in a collective the others never "
            "reach: set steps to a number of batches every rank has"
        )
    rank, infinite = kwargs["dp_rank"], validation.steps != -1
    if is_instruction_dataset(validation.dataset):
        build = partial(instruction_loader, job_config, "validation", kwargs["tokenizer"], rank,
                        world, infinite)
    elif document_aware(job_config):
        build = partial(document_packed_loader, job_config, "validation", kwargs["tokenizer"],
                        rank, world, infinite)
    else:
        build = partial(build_text_validation_dataloader, world, rank, kwargs["tokenizer"],
                        job_config, infinite)
    loader = with_documents(build, validation, "validation", rank, world)
    return RATValidator(job_config=job_config, dataloader=loader, **kwargs)


def with_documents(build, data, section: str, dp_rank: int, dp_world_size: int):
    """``build()``, a dataloader over this rank's share of the ``[section]`` dataset, after
    every rank has checked its share holds a document: else each rank stops with the one line
    (a rank without data loops forever looking for it while the others wait)."""
    try:
        loader = build()
    except IndexError as err:  # datasets' split_dataset_by_node: fewer documents than ranks
        if "out of range for dataset of size" not in str(err):
            raise
        loader = None
    share = (dp_rank, loader is None or not has_documents(loader.dataset))
    shares = [share]
    if dist.is_initialized() and dist.get_world_size() > 1:
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, share)
    empty = sorted({rank for rank, no_documents in shares if no_documents})
    problem = documents_problem(data.dataset, data.dataset_path, section, empty, dp_world_size)
    if problem is not None:
        raise problem
    return loader


def document_aware(job_config: JobConfig) -> bool:
    rat = getattr(job_config, "rat", None)
    return rat is not None and rat.document_aware


def document_packed_loader(
    job_config: JobConfig, section: str, tokenizer, dp_rank: int, dp_world_size: int,
    infinite: bool,
) -> ParallelAwareDataloader:
    """The ``[training]`` or ``[validation]`` data packed document-aware."""
    data = getattr(job_config, section)
    chunk_size = make_args(job_config.model.name, job_config.model.flavor).chunk_size
    try:
        dataset = DocumentPackedDataset(
            data.dataset, data.dataset_path, tokenizer, seq_len=data.seq_len,
            dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=infinite,
            chunk_size=chunk_size,
        )
    except ValueError as e:
        raise ConfigError(f"[rat] document_aware, [{section}] {e}") from None
    return batches(dataset, data, dp_rank, dp_world_size)


def batches(dataset, data, dp_rank: int, dp_world_size: int) -> ParallelAwareDataloader:
    """torchtitan's loader of ``dataset`` with the ``[training]`` / ``[validation]`` settings
    ``data``."""
    return ParallelAwareDataloader(
        dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
        **{**dataclasses.asdict(data.dataloader), "batch_size": data.local_batch_size},
    )


def instruction_loader(
    job_config: JobConfig, section: str, tokenizer, dp_rank: int, dp_world_size: int,
    infinite: bool,
) -> ParallelAwareDataloader:
    """The ``[training]`` or ``[validation]`` instruction records as answer-only examples,
    packed document-aware (``rat_plugin.data.sft``)."""
    data = getattr(job_config, section)
    sft = getattr(job_config, "sft", None)
    if sft is None:
        raise ConfigError(
            f"[{section}] dataset={data.dataset!r} is read with the [sft] settings: add [job] "
            'custom_config_module = "rat_plugin.infra.config" to the config'
        )
    config, _, own_template = SFT_DATASETS[data.dataset.lower()]
    template = sft.template or own_template
    if not template:
        raise ConfigError(
            f"[sft] template is not set for [{section}] dataset={data.dataset!r}: name one of "
            f"{', '.join(TEMPLATES)} or give a template string over the records' fields"
        )
    chunk_size = make_args(job_config.model.name, job_config.model.flavor).chunk_size
    try:
        dataset = InstructionPackedDataset(
            data.dataset, data.dataset_path or config.path, tokenizer, seq_len=data.seq_len,
            dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=infinite,
            chunk_size=chunk_size, template=template, answer_field=sft.answer_field,
            bos=sft.bos, section=section,
        )
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"[{section}] {e}") from None
    return batches(dataset, data, dp_rank, dp_world_size)


class Float8NameError:
    """Registered as converter "float8" so that name fails with the right one."""

    def __init__(self, job_config: JobConfig, parallel_dims) -> None:
        raise ConfigError(
            '[model] converters = ["float8"]: the converter is named "quantize.linear.float8" '
            "in torchtitan 0.2.2 (settings under [quantize.linear.float8])"
        )


def get_train_spec(kind: str) -> TrainSpec:
    return TrainSpec(
        model_cls=RATModel,
        model_args=Flavors(kind),
        parallelize_fn=parallelize_rat,
        pipelining_fn=None,
        build_optimizers_fn=build_guarded_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_finite_loss,
        build_validator_fn=build_rat_validator,
        state_dict_adapter=RATStateDictAdapter,
    )


if cpu.cpu_mode():
    cpu.use_cpu()
register_datasets()
explain_full_disk()
complete_hf_saves()
if "float8" not in _registry_model_converter_cls:
    register_model_converter(Float8NameError, "float8")
sys.excepthook = one_line_excepthook()
for _kind in MODEL_KINDS:
    register_train_spec(_kind, get_train_spec(_kind))
_job = launched_job()
if _job is not None:
    check_launch(_job)

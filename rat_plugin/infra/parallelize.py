"""Apply TP, activation checkpointing, torch.compile, CP and FSDP2/HSDP to a RATModel.

Order: TP -> AC -> compile -> CP hook -> FSDP or DDP (as in torchtitan's llama3). torchtitan's
``apply_ac`` and llama3's ``apply_compile`` / ``apply_ddp`` work unchanged because RATModel
uses llama3's attribute names (``layers`` is a ModuleDict of blocks). FSDP is ours: the
embedding is tied to the LM head, so ``tok_embeddings``, ``norm`` and ``output`` stay in the
root unit together (torchtitan's ``apply_fsdp`` shards the embedding on its own, which would
split the tied weight across two units). DDP gets a communication hook that sums gradients, as
FSDP's division is disabled: the trainer divides the loss by the global token count.

Compile is per block with ``fullgraph=True`` (llama3's ``apply_compile``, backend from
``[compile] backend``) on both paths: the GPU kernels (Triton scan, flex attention) are traceable
custom ops (docs/gpu_fast_path.md), and the portable ops run plain tensor ops while
``torch.compiler.is_compiling()`` (their eager autograd Functions write into views and pick query
blocks from tensor values, which dynamo cannot trace). tests/test_trainer_parallel.py checks
compile and AC against the eager losses through the trainer.

Context parallel: torchtitan 0.2.2's trainer only shards the batch and passes ``positions``;
it never enters torch's SDPA ring-attention context by itself (that happens only if a
parallelize_fn calls ``apply_cp_to_attention_module``). So CP for RAT is entirely
``rat_plugin.infra.context_parallel.apply_cp``, which installs the chunk-summary exchange.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp
from torchtitan.models.llama3.infra.parallelize import (
    apply_compile,
    apply_ddp,
    disable_fsdp_gradient_division,
)
from torchtitan.tools.logging import logger

from rat_plugin.infra import ConfigError, cpu
from rat_plugin.infra.settings import compiles_model

# Selective op AC keeps these outputs (and every other matmul) instead of recomputing them:
# torchtitan llama3's list, with flex_attention (RAT's summary attention and SWA on GPUs).
_OP_SAC_SAVE_LIST = {
    torch.ops.aten.mm.default,
    torch.ops.aten.max.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch._higher_order_ops.flex_attention,
}


def parallelize_rat(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig):
    """torchtitan ``parallelize_fn`` for the RAT family (model on meta, weights not yet init)."""
    compile_model = compiles_model(job_config)
    if compile_model:
        check_compile(parallel_dims, job_config.compile.backend)

    if parallel_dims.tp_enabled:
        from rat_plugin.infra.tensor_parallel import apply_tp

        float8 = job_config.quantize.linear.float8
        tp_mesh = parallel_dims.get_mesh("tp")
        apply_tp(
            model,
            tp_mesh,
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            enable_float8="quantize.linear.float8" in job_config.model.converters
            and float8.recipe_name in (None, "tensorwise"),
        )
        maybe_enable_async_tp(job_config, tp_mesh)

    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_OP_SAC_SAVE_LIST,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model:
        apply_compile(model, job_config.compile)

    if parallel_dims.cp_enabled:
        from rat_plugin.infra.context_parallel import apply_cp

        apply_cp(model, parallel_dims.get_mesh("cp"))

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
            cpu_offload=job_config.training.enable_cpu_offload,
        )
        logger.info(f"Applied {'HSDP' if parallel_dims.dp_replicate_enabled else 'FSDP'}")
    elif parallel_dims.dp_replicate_enabled:
        dp_mesh = parallel_dims.get_mesh("dp_replicate")
        apply_ddp(model, dp_mesh, enable_compile=compile_model)
        # The trainer divides the loss by the global token count already (FSDP's own division
        # is disabled for that reason): DDP must sum the gradients, not average them again.
        model.register_comm_hook(dp_mesh.get_group(), allreduce_sum)
        logger.info("DDP sums the gradients (the loss is already divided by the global tokens)")
    return model


def allreduce_sum(group, bucket):
    """DDP communication hook: the sum of the ranks' gradients (DDP's default divides it by the
    number of ranks)."""
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def check_compile(parallel_dims: ParallelDims, backend: str) -> None:
    """Refuse compiled blocks under TP on CPU ranks, where torch's AOTAutograd crashes in backward.

    A compiled region between sequence-parallel layers fails there: DTensor's ``Redistribute``
    backward receives a plain tensor (``'Tensor' object has no attribute '_local_tensor'``). This
    happens with torchtitan's own llama3 and with a toy embedding/Linear model too, under
    aot_eager and inductor alike. Dynamo alone (backend "eager") runs. Untested on GPUs.
    """
    if parallel_dims.tp_enabled and cpu.cpu_mode() and backend != "eager":
        raise ConfigError(
            f"compile.backend={backend!r} with tensor_parallel_degree > 1 crashes in backward on "
            f"CPU ranks (torch {torch.__version__}: AOTAutograd and DTensor): set compile.enable "
            "= false or tensor_parallel_degree = 1"
        )


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward_policy: str = "default",
    cpu_offload: bool = False,
) -> None:
    """FSDP2 (HSDP on a 2-D mesh): one unit per block, the root unit holds the tied
    embedding/head and the final norm.

    Policy "default" and "always" reshard blocks after forward; "never" keeps them gathered.
    The root unit reshards after forward only under "always": its weights are needed again at
    the very start of backward.
    """
    if reshard_after_forward_policy not in ("default", "always", "never"):
        raise ValueError(
            f"parallelism.fsdp_reshard_after_forward={reshard_after_forward_policy!r}: "
            "use 'default', 'always' or 'never'"
        )
    config: dict = dict(
        mesh=dp_mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    )
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    reshard_blocks = reshard_after_forward_policy != "never"
    for block in model.layers.values():
        fully_shard(block, **config, reshard_after_forward=reshard_blocks)
    fully_shard(model, **config, reshard_after_forward=reshard_after_forward_policy == "always")
    # The trainer divides the loss by the global token count: sum gradients, do not average.
    disable_fsdp_gradient_division(model)
    if cpu.cpu_mode():
        cpu.force_sum_reduction(model)

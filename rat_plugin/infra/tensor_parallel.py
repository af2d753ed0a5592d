"""Tensor parallel plan for RAT, RAT-SWA and the attention baselines (DTensor; runs on gloo too).

Heads are sharded over the TP mesh, activations between blocks are sequence-sharded (Shard(1)):

- ``tok_embeddings`` row-wise (vocab rows sharded, output Shard(1)); ``output`` column-wise with
  loss parallel (Shard(-1) logits) or replicated logits. Its weight is tied to the embedding's:
  both are Shard(0) of the same (vocab, dim) tensor, and the tie is restored after sharding.
- every RMSNorm: SequenceParallel; mixer and FFN inputs are all-gathered to Replicate.
- RAT: ``wv``, ``wg`` (weight and bias b_g), ``wz`` column-wise, ``wo`` row-wise. The grouped
  ``wq``/``wk`` (G*d outputs; head h uses group h mod G) are small and REPLICATED: each rank
  computes all G groups and tiles them over its local heads, so the gradient reaching their
  output is this rank's heads' share only. ``GroupedProjection`` returns the output as a local
  tensor whose gradient is declared ``Partial`` over TP, which sums the ranks' shares into the
  Replicate weight gradient. Tiling stays right when each rank's first head is a multiple of G,
  i.e. when (n_heads / tp) % G == 0.
- SWA / full attention: ``wq``, ``wk``, ``wv`` column-wise, ``wo`` row-wise.
- FFN: ``w1`` column-wise, ``w2`` row-wise.

float8 (``enable_float8``): modules already swapped to torchao's ``Float8Linear`` get
``Float8ColwiseParallel`` / ``Float8RowwiseParallel``; the others keep the plain styles. Inputs
are all-gathered in high precision (the float8 styles cast after the all-gather).
"""

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from rat_plugin.infra import ConfigError
from rat_plugin.model.args import RATModelArgs


class GroupedProjection(ParallelStyle):
    """A Linear replicated on the TP mesh whose output feeds only the local heads.

    Parameters become Replicate DTensors; the output is a local tensor whose gradient is a
    partial sum over the TP ranks (``grad_placements=(Partial(),)``), so the weight gradient and
    the input gradient sum every rank's contribution.
    """

    @staticmethod
    def _prepare_input(mod: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
        elif x.placements != (Replicate(),):
            x = x.redistribute(placements=(Replicate(),))
        return (x, *inputs[1:])

    @staticmethod
    def _prepare_output(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        return output.to_local(grad_placements=(Partial(),))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, None, self._prepare_input, self._prepare_output
        )


def check_tp_degree(args: RATModelArgs, tp: int) -> None:
    """Raise a one-line ConfigError when ``args`` cannot be sharded over ``tp`` ranks."""
    fix = "choose tensor_parallel_degree accordingly"
    mixers = {args.layer_mixer(i) for i in range(args.n_layers)}
    if "rat" in mixers and (args.n_heads % tp or (args.n_heads // tp) % args.n_groups):
        raise ConfigError(
            f"tensor_parallel_degree={tp} cannot shard RAT with n_heads={args.n_heads} and "
            f"n_groups={args.n_groups}: each rank needs a multiple of G heads, so the degree "
            f"must divide n_heads // n_groups = {args.n_heads // args.n_groups}"
        )
    if args.n_heads % tp:
        raise ConfigError(
            f"tensor_parallel_degree={tp} does not divide n_heads={args.n_heads}: {fix}"
        )
    for name in ("dim", "ffn_hidden_dim"):
        if getattr(args, name) % tp:
            raise ConfigError(
                f"tensor_parallel_degree={tp} does not divide {name}={getattr(args, name)}: {fix}"
            )


def _linear_styles(enable_float8: bool):
    """(colwise, rowwise) style factories; with float8 they pick per module."""
    if not enable_float8:
        return ColwiseParallel, RowwiseParallel
    try:
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
        )
    except ImportError as e:
        raise ImportError(
            "float8 tensor parallel needs torchao: pip install 'rat-titan[float8]' "
            "(or drop quantize.linear.float8 from [model] converters)"
        ) from e

    def colwise(**kw) -> ParallelStyle:
        return _Pick(Float8Linear, Float8ColwiseParallel(**kw), ColwiseParallel(**kw))

    def rowwise(**kw) -> ParallelStyle:
        return _Pick(Float8Linear, Float8RowwiseParallel(**kw), RowwiseParallel(**kw))

    return colwise, rowwise


def apply_tp(
    model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool, enable_float8: bool
) -> None:
    """Shard ``model`` (a RATModel, not yet FSDP-wrapped or compiled) over ``tp_mesh`` in place."""
    check_tp_degree(model.args, tp_mesh.size())

    colwise, rowwise = _linear_styles(enable_float8)

    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    # Both are Shard(0) of the same (vocab, dim) tensor: share the one DTensor parameter again.
    model.output.weight = model.tok_embeddings.weight

    for layer_id, block in model.layers.items():
        kind = model.args.layer_mixer(int(layer_id))
        plan: dict[str, ParallelStyle] = {
            "mixer_norm": SequenceParallel(),
            # mixer(u, positions, cache, doc_starts): only u is a DTensor.
            "mixer": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "mixer.wo": rowwise(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": colwise(),
            "feed_forward.w2": rowwise(output_layouts=Shard(1)),
        }
        if kind == "rat":
            plan.update({f"mixer.{n}": colwise() for n in ("wv", "wg", "wz")})
            plan.update({f"mixer.{n}": GroupedProjection() for n in ("wq", "wk")})
        else:
            plan.update({f"mixer.{n}": colwise() for n in ("wq", "wk", "wv")})
        parallelize_module(block, tp_mesh, plan)


class _Pick(ParallelStyle):
    """Apply ``float8_style`` to torchao Float8Linear modules and ``plain`` to the rest."""

    def __init__(self, float8_linear: type, float8_style: ParallelStyle, plain: ParallelStyle):
        super().__init__()
        self.float8_linear, self.float8_style, self.plain = float8_linear, float8_style, plain

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = self.float8_style if isinstance(module, self.float8_linear) else self.plain
        return style._apply(module, device_mesh)

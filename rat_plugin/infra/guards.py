"""Training stops at the first non-finite loss or gradient, before the optimizer step.

torchtitan saves a checkpoint after the optimizer step, so stopping before it means no
checkpoint ever holds a state reached through a non-finite value. The loss is checked as each
microbatch computes it; the gradients, whose norm torchtitan's clipping turns into NaN weights
when it is infinite, just before the optimizer step (their local shards: no collective). Cost:
one host sync of a scalar per microbatch and one per step.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.optimizer import build_optimizers

from rat_plugin.infra import NonFiniteError

STOPPED = (
    "stopped before the optimizer step, so no checkpoint holds this state: resume from an "
    "earlier checkpoint (--checkpoint.load_step) or, if the run diverged, lower [optimizer] lr"
)


def _rank() -> str:
    return f" on rank {dist.get_rank()}" if dist.is_initialized() else ""


def finite_loss(loss_fn):
    """``loss_fn`` raising NonFiniteError on a non-finite loss."""

    def checked(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(pred, labels)
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the loss is {value}{_rank()} (non-finite weights from a corrupt checkpoint, "
                f"or a diverged run): {STOPPED}"
            )
        return loss

    checked.unchecked = loss_fn  # for the validator, which checks its whole mean instead
    return checked


def build_finite_loss(job_config, **kwargs):
    """torchtitan's cross-entropy loss, checked (TrainSpec.build_loss_fn)."""
    return finite_loss(build_cross_entropy_loss(job_config, **kwargs))


def check_gradients(named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Raise NonFiniteError naming the parameter whose gradient is not finite (after
    torchtitan's clipping by a non-finite norm, every gradient is: then it says so)."""
    named_grads = [
        (name, p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
        for name, p in named_params if p.grad is not None
    ]
    if not named_grads:
        return
    largest = torch.stack([g.detach().abs().amax().float() for _, g in named_grads]).tolist()
    bad = [name for (name, _), value in zip(named_grads, largest) if not math.isfinite(value)]
    if bad:
        which = (f"the gradient of {bad[0]} is not finite" if len(bad) == 1 else
                 f"the gradients of {len(bad)} of {len(named_grads)} parameters are not finite "
                 f"(the first is {bad[0]}, but gradient clipping by a non-finite norm spreads "
                 "one bad gradient to all)")
        raise NonFiniteError(f"{which}{_rank()} with a finite loss: {STOPPED}")


def build_guarded_optimizers(model_parts, optimizer_config, parallel_dims, **kwargs):
    """torchtitan's optimizers, with the gradients checked before every step
    (TrainSpec.build_optimizers_fn)."""
    optimizers = build_optimizers(model_parts, optimizer_config, parallel_dims, **kwargs)
    named_params = [
        (name, p) for part in model_parts for name, p in part.named_parameters() if p.requires_grad
    ]
    optimizers.register_step_pre_hook(lambda *args, **kwargs: check_gradients(named_params))
    return optimizers

"""Validation during training: torchtitan's Validator, fixed for RAT (TrainSpec.build_validator_fn).

What differs from torchtitan 0.2.2's ``Validator.validate``:
- every validation reads the same held-out batches (the dataloader is rewound): its loader keeps
  its position between calls, so on a map-style split each validation read the next batches and,
  with ``steps = -1``, the second one found no data left;
- context parallel is RAT's own (``infra/context_parallel.py``): the trainer's sharding of tokens,
  labels and global positions, without torch's SDPA ring-attention context (it shards
  ``freqs_cis`` buffers RAT does not have);
- the loss is the mean over every held-out token: the summed loss over all DP and CP ranks
  divided by the tokens counted before CP sharding (counted after it, torchtitan's mean is cp
  times too large);
- perplexity (exp of the loss) is logged with it (``validation_metrics/perplexity``).

A non-finite validation loss stops the run on every rank (the check is on the mean over all of
them), saying that the checkpoint of that step holds the weights: torchtitan validates after it
saves (the training loss guard of ``infra/guards.py`` stops before the optimizer step instead).
"""

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import Validator
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.context_parallel import prepare_context_parallel_input
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from rat_plugin.infra import ConfigError, NonFiniteError


class RATValidator(Validator):
    def __init__(self, dataloader=None, **kwargs):
        """``dataloader``: the held-out batches, if not torchtitan's text dataloader (the
        train spec passes its own, each rank's share checked to hold documents; with ``[rat]
        document_aware``, the documents packed as in training)."""
        super().__init__(**kwargs)
        if dataloader is not None:
            self.validation_dataloader = dataloader
        self._start = self.validation_dataloader.state_dict()

    def post_dataloading_process(self, input_dict, labels, model_parts):
        """(inputs, labels, extra_inputs, kwargs): RAT needs no attention masks; under CP the
        local pieces and their global ``positions``, as the trainer's training step shards them
        (``document_starts``, an extra input, stays whole: the model reads it by position)."""
        inputs, kwargs = input_dict["input"], {}
        extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
        if self.parallel_dims.cp_enabled:
            inputs, labels, kwargs = prepare_context_parallel_input(
                inputs, labels, kwargs, self.parallel_dims.get_mesh("cp"), inputs.device,
                self.job_config.parallelism.context_parallel_load_balancer,
            )
        return inputs, labels, extra_inputs, kwargs

    @torch.no_grad()
    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        (model,) = model_parts  # no pipeline parallel (pipelining_fn=None)
        model.eval()
        self.validation_dataloader.load_state_dict(self._start)
        device, max_steps = utils.device_type, self.job_config.validation.steps
        loss_fn = getattr(self.loss_fn, "unchecked", self.loss_fn)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        tokens = torch.zeros((), dtype=torch.int64, device=device)
        for num_steps, (input_dict, labels) in enumerate(self.validation_dataloader):
            if num_steps == max_steps:
                break
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            labels = labels.to(device)
            tokens += (labels != IGNORE_INDEX).sum()
            inputs, labels, extra_inputs, kwargs = self.post_dataloading_process(
                {k: v.to(device) for k, v in input_dict.items()}, labels, model_parts
            )
            with self.validation_context(), self.maybe_enable_amp:
                loss = loss_fn(model(inputs, **extra_inputs, **kwargs), labels)
            loss_sum += loss.full_tensor() if isinstance(loss, DTensor) else loss  # TP
        dims = self.parallel_dims
        total = dist_utils.dist_sum(loss_sum, dims.get_optional_mesh("loss"))
        count = dist_utils.dist_sum(tokens, dims.get_optional_mesh("batch"))
        if count == 0:
            raise ConfigError(
                f"[validation] dataset {self.job_config.validation.dataset!r} gave no batch of "
                f"seq_len={self.job_config.validation.seq_len}: use more data or a shorter "
                "[validation] seq_len"
            )
        loss = total / count
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"the validation loss at step {step} is {loss}: the weights of step {step} give "
                "non-finite outputs on held-out data (a checkpoint saved at this step holds "
                "them): resume from an earlier checkpoint (--checkpoint.load_step) or, if the "
                "run diverged, lower [optimizer] lr"
            )
        perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond
        self.metrics_processor.log_validation(
            loss=loss, step=step, extra_metrics={"validation_metrics/perplexity": perplexity}
        )
        logger.info(f"validate step: {step:2}  perplexity: {perplexity:.4f}")
        model.train()

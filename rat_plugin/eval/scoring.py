"""Scoring token sequences with a model: what lm-evaluation-harness and the long-context tools
measure (plain PyTorch)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rat_plugin.generate.step import DecodeStep
from rat_plugin.model import RATModel


def _device(model: RATModel) -> torch.device:
    return model.tok_embeddings.weight.device


@torch.inference_mode()
def continuation_logprobs(
    model: RATModel, sequences: Sequence[Sequence[int]], continuation_lengths: Sequence[int]
) -> list[tuple[float, bool]]:
    """Per token sequence: (sum of the log-probabilities of its last n tokens given the tokens
    before them, whether each of them is the most likely token there).

    One forward over the batch, right-padded: the model is causal, so the padding after a
    sequence never reaches its logits.
    """
    device = _device(model)
    inputs = torch.zeros(len(sequences), max(len(s) for s in sequences) - 1, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
    logits = model(inputs.to(device))
    results = []
    for row, (sequence, n) in enumerate(zip(sequences, continuation_lengths)):
        if n == 0:  # an empty continuation: probability 1
            results.append((0.0, True))
            continue
        end = len(sequence) - 1  # logits at position t predict token t + 1
        logprobs = logits[row, end - n: end].float().log_softmax(-1)
        target = torch.tensor(sequence[-n:], device=device)
        total = logprobs.gather(-1, target[:, None]).sum()
        greedy = (logprobs.argmax(-1) == target).all()
        results.append((float(total), bool(greedy)))
    return results


@torch.inference_mode()
def position_losses(
    model: RATModel, windows: torch.Tensor, prefill: int, cuda_graph: bool = False
) -> torch.Tensor:
    """(B, T - 1) losses of token t + 1 given tokens 0..t of each (B, T) window, through the
    decode cache: one prefill forward over the first ``prefill`` tokens, then one cached decode
    step per token. Memory stays that of the caches (O(T / L) per RAT layer) and one prefill,
    however long the windows."""
    batch, length = windows.shape
    if not 1 <= prefill <= length - 1:
        raise ValueError(f"prefill={prefill} must be in [1, {length - 1}] for windows of {length}")
    windows = windows.to(_device(model))
    caches = model.new_caches(torch.full((batch,), prefill, device=windows.device), length - 1)
    logits = model(windows[:, :prefill], caches=caches).float()
    targets = windows[:, 1: prefill + 1]
    losses = [F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")]
    if prefill < length - 1:
        step = DecodeStep(model, caches, cuda_graph)
        for t in range(prefill, length - 1):
            logits = step(windows[:, t])
            losses.append(F.cross_entropy(logits, windows[:, t + 1], reduction="none")[:, None])
    return torch.cat(losses, dim=1)

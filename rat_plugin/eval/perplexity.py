"""Loss by token position over a text (tools/perplexity_by_position.py): the windows the text is
cut into, and the per-position losses averaged into buckets."""

import math

import torch


def token_windows(tokens: list[int], length: int, count: int, bos: int | None) -> torch.Tensor:
    """Up to ``count`` consecutive, non-overlapping windows of ``length`` tokens from the start
    of ``tokens``, (count, length); with ``bos`` each is BOS + the next length - 1 tokens."""
    body = length - (bos is not None)
    windows = min(count, len(tokens) // body)
    if windows == 0:
        raise ValueError(
            f"the text has {len(tokens)} tokens, fewer than one window of {body}: give a longer "
            "text or a smaller --length"
        )
    rows = torch.tensor(tokens[: windows * body]).view(windows, body)
    if bos is not None:
        rows = torch.cat((torch.full((windows, 1), bos), rows), dim=1)
    return rows


def by_position(losses: torch.Tensor, bucket: int) -> dict:
    """Per-position mean losses of (B, T - 1) window losses (column j is the loss of token
    j + 1), and their means over buckets of ``bucket`` positions: {"loss_by_position",
    "positions" (each bucket's first position), "loss", "perplexity"}."""
    mean = losses.double().mean(dim=0)
    buckets = [mean[start: start + bucket] for start in range(0, mean.numel(), bucket)]
    loss = [float(b.mean()) for b in buckets]
    return {
        "loss_by_position": [float(v) for v in mean],
        "positions": [1 + start for start in range(0, mean.numel(), bucket)],
        "loss": loss,
        "perplexity": [math.exp(v) if v < 700 else math.inf for v in loss],
    }

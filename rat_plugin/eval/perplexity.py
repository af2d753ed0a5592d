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
    "bucket", "positions" (each bucket's first position), "loss", "perplexity",
    "loss_by_window" (B rows: each window's mean loss per bucket, the spread behind the
    mean)}."""
    losses = losses.double()
    mean = losses.mean(dim=0)
    starts = range(0, mean.numel(), bucket)
    loss = [float(mean[start: start + bucket].mean()) for start in starts]
    return {
        "loss_by_position": [float(v) for v in mean],
        "bucket": bucket,
        "positions": [1 + start for start in starts],
        "loss": loss,
        "perplexity": [math.exp(v) if v < 700 else math.inf for v in loss],
        "loss_by_window": [[float(row[start: start + bucket].mean()) for start in starts]
                           for row in losses],
    }

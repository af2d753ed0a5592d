"""Rotary position embedding, rotate-half convention, full head dim.

Angles are computed from the positions on the fly, so any position (chunk index or token index,
also past the training length) is valid and no table has to be rebuilt after meta init.
"""

import torch


def rope_angles(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,) for integer ``positions``."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64)
    inv_freq = base ** (-exponent / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., head_dim) by angles whose cos/sin broadcast against it."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated_half * sin

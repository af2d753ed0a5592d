"""Context parallel for RAT: all-gather chunk summaries, keep the recurrence local (DESIGN.md 4).

The trainer shards tokens, labels and global ``positions`` along the sequence over the CP mesh
(``prepare_context_parallel_input``; default "headtail": rank r holds pieces r and 2*cp-1-r of
seq_len / (2*cp) tokens). When every piece holds whole chunks, the chunk recurrence never crosses
a rank. Each RAT layer then all-gathers its (batch, chunks, heads, head_dim) summary keys and
values, plus their global chunk ids, over the CP group; every query attends to the gathered
summaries under the causal mask on global chunk ids. The all-gather is autograd-aware: its
backward reduce-scatters (sums) the summary gradients back to the rank that produced them. Per
layer and step that moves T/L tokens' K and V, against T tokens' for ring attention.

Refused (a clear error, never wrong numbers): sliding-window layers (RAT-SWA) would need the
W-token halo from the neighbouring piece, and full-attention layers would need ring attention.
"""

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from rat_plugin.infra import ConfigError
from rat_plugin.model.rat import RAT


class SummaryAllGather:
    """``RAT.summary_exchange`` over a 1-D CP mesh: one all-gather of [K | V] and one of ids."""

    def __init__(self, cp_mesh: DeviceMesh):
        self.cp_mesh = cp_mesh

    def __call__(
        self, summary_k: torch.Tensor, summary_v: torch.Tensor, summary_chunk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head_dim = summary_k.shape[-1]
        # (B, N, H, 2d) -> chunks first, gathered along dim 0 -> back to (B, N * cp, H, 2d).
        kv = torch.cat((summary_k, summary_v), dim=-1).transpose(0, 1).contiguous()
        kv = funcol.all_gather_single(kv, 0, self.cp_mesh).transpose(0, 1)
        chunks = funcol.all_gather_single(summary_chunk.contiguous(), 0, self.cp_mesh)
        return kv[..., :head_dim], kv[..., head_dim:], chunks


class PieceAlignmentCheck:
    """Forward pre-hook: CP needs ``positions`` and pieces made of whole chunks."""

    def __init__(self, chunk_size: int, cp: int):
        self.chunk_size, self.cp = chunk_size, cp

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None:
            raise ConfigError(
                "context parallel needs the global `positions` of the local tokens: call "
                "model(tokens, positions=...) as torchtitan's prepare_context_parallel_input does"
            )
        pos = (positions[0] if positions.dim() == 2 else positions).long()
        L, cp = self.chunk_size, self.cp
        aligned = pos.numel() % L == 0
        if aligned:
            blocks = pos.view(-1, L)
            offsets = blocks - blocks[:, :1]
            aligned = bool(
                (blocks[:, 0] % L == 0).all()
                and (offsets == torch.arange(L, device=pos.device)).all()
            )
        if not aligned:
            raise ConfigError(
                f"context parallel split seq_len={pos.numel() * cp} over cp={cp} into pieces "
                f"that do not hold whole chunks of chunk_size={L}: use a seq_len that is a "
                f"multiple of 2 * cp * chunk_size = {2 * cp * L} (headtail balancer) or of "
                f"cp * chunk_size = {cp * L} (no load balancer)"
            )


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Make every RAT layer of ``model`` exchange chunk summaries over ``cp_mesh``, in place."""
    for layer_id, block in model.layers.items():
        mixer = block.mixer
        if isinstance(mixer, RAT):
            continue
        if getattr(mixer, "window", None) is not None:
            raise ConfigError(
                f"context parallel supports rat only: layer {layer_id} is sliding-window "
                "attention (RAT-SWA), which needs the W-token halo exchange with the neighbouring "
                "piece, not implemented: use context_parallel_degree 1 for rat_swa"
            )
        raise ConfigError(
            f"context parallel supports rat only: layer {layer_id} is full attention, which "
            "would need ring attention (torch's SDPA context parallel, not wired for this model): "
            "use context_parallel_degree 1 for the attention baselines"
        )
    exchange = SummaryAllGather(cp_mesh)
    for block in model.layers.values():
        block.mixer.summary_exchange = exchange
    model.register_forward_pre_hook(
        PieceAlignmentCheck(model.args.chunk_size, cp_mesh.size()), with_kwargs=True
    )

"""Context parallel for RAT: all-gather chunk summaries, keep the recurrence local
(docs/design.md section 4).

The trainer shards tokens, labels and global ``positions`` along the sequence over the CP mesh
(``prepare_context_parallel_input``; default "headtail": rank r holds pieces r and 2*cp-1-r of
seq_len / (2*cp) tokens). When every piece holds whole chunks, the chunk recurrence never crosses
a rank. Each RAT layer then all-gathers its (batch, chunks, heads, head_dim) summary keys and
values, plus their global chunk ids, over the CP group; every query attends to the gathered
summaries under the causal mask on global chunk ids. The all-gather is autograd-aware: its
backward reduce-scatters (sums) the summary gradients back to the rank that produced them. Per
layer and step that moves T/L tokens' K and V, against T tokens' for ring attention.

Sliding-window layers (RAT-SWA) need, for each local piece, the W tokens before it, held by
other pieces. Every rank sends the rotated K and V of the last min(W, piece) tokens of each of its
pieces (one autograd all-gather per layer); each piece then attends to [its halo | itself] under
the window mask on global positions. The halo layout (which gathered tokens precede which piece)
is computed by a pre-hook, outside any compiled region, once per shape of ``positions`` (with a
host sync and small collectives); later forwards only check on the device, without a sync, that
their positions are the ones it was computed from.
Per layer each rank sends min(W, piece) tokens' K and V per piece, independent of T.

Refused (a clear error, never wrong numbers): full-attention layers (the attention baselines)
would need ring attention.
"""

import itertools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from rat_plugin.infra import ConfigError
from rat_plugin.model.rat import RAT
from rat_plugin.model.swa import SlidingWindowAttention


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (for torch 2.11's all-gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _all_gather(tensor: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """The autograd-aware all-gather (backward reduce-scatters): torch 2.13's
    ``all_gather_single``; torch 2.11's ``all_gather_tensor_autograd`` reduce-scatters only a
    contiguous gradient (the slices and transposes after the gather give a strided one)."""
    if hasattr(funcol, "all_gather_single"):
        return funcol.all_gather_single(tensor, dim, mesh)
    return _ContiguousGrad.apply(funcol.all_gather_tensor_autograd(tensor, dim, mesh))


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
        kv = self.all_gather(kv).transpose(0, 1)
        chunks = self.all_gather(summary_chunk.contiguous())
        return kv[..., :head_dim], kv[..., head_dim:], chunks

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0; backward reduce-scatters (sums)."""
        return _all_gather(tensor, 0, self.cp_mesh)


def _positions(args: tuple, kwargs: dict) -> torch.Tensor:
    """The (T_local,) global positions from a ``RATModel.forward`` call."""
    positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
    if positions is None:
        raise ConfigError(
            "context parallel needs the global `positions` of the local tokens: call "
            "model(tokens, positions=...) as torchtitan's prepare_context_parallel_input does"
        )
    return (positions[0] if positions.dim() == 2 else positions).long()


class OncePerShape:
    """What the pre-hooks derive from ``positions``, kept per positions shape: the trainer hands
    every step the same positions for a shape. A later lookup asserts, on the device (no host
    sync), that the positions are the ones the entry was derived from."""

    def __init__(self):
        self._entries: dict[tuple, tuple[torch.Tensor, object]] = {}

    def get(self, pos: torch.Tensor):
        entry = self._entries.get((tuple(pos.shape), pos.device))
        if entry is None:
            return None
        first, value = entry
        torch._assert_async(
            (pos == first).all(),
            "context parallel: the positions changed for an earlier positions shape; the CP "
            "layout is derived once per shape",
        )
        return value

    def put(self, pos: torch.Tensor, value) -> None:
        self._entries[(tuple(pos.shape), pos.device)] = (pos.clone(), value)


class PieceAlignmentCheck:
    """Forward pre-hook: CP needs ``positions`` and pieces made of whole chunks (checked once
    per positions shape)."""

    def __init__(self, chunk_size: int, cp: int):
        self.chunk_size, self.cp = chunk_size, cp
        self._checked = OncePerShape()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pos = _positions(args, kwargs)
        if self._checked.get(pos):
            return
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
        self._checked.put(pos, True)


class HaloLayout:
    """Forward pre-hook: where each local piece's halo lies among the tails all ranks send.

    ``pieces``: (start, end) local token ranges of the contiguous pieces; ``send``: local indices
    of the last min(W, piece length) tokens of every piece; ``halo[i]``: indices, into the
    gathered tails, of the tokens at global positions [s - W, s) before piece i (start s);
    ``key_pos[i]``: global positions of [halo | piece] keys.
    """

    def __init__(self, cp_mesh: DeviceMesh, window: int):
        self.cp_mesh, self.window = cp_mesh, window
        self._layouts = OncePerShape()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pos = _positions(args, kwargs)
        layout = self._layouts.get(pos)
        if layout is None:
            layout = self._layout(pos)
            self._layouts.put(pos, layout)
        self.pieces, self.send, self.halo, self.key_pos = layout

    def _layout(self, pos: torch.Tensor) -> tuple:
        """(pieces, send, halo, key_pos) for these positions: a host sync and collectives over
        the CP group (every rank has the same positions shape, so all compute it together)."""
        breaks = ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
        bounds = [0, *breaks, pos.numel()]
        runs = list(itertools.pairwise(bounds))
        # Ranks must send equally many tokens: cut every contiguous run into pieces of the
        # shortest run over the CP group (headtail: rank cp/2-1 holds two adjacent pieces).
        group = self.cp_mesh.get_group()
        piece = torch.tensor(min(end - start for start, end in runs), device=pos.device)
        dist.all_reduce(piece, op=dist.ReduceOp.MIN, group=group)
        piece = int(piece)
        uneven = torch.tensor(
            int(any((end - start) % piece for start, end in runs)), device=pos.device
        )
        dist.all_reduce(uneven, op=dist.ReduceOp.MAX, group=group)  # every rank raises alike
        if uneven:
            raise ConfigError(
                f"sliding-window layers under context parallel need pieces of equal length, got "
                f"runs of {[end - start for start, end in runs]} tokens: use the headtail load "
                "balancer or none"
            )
        pieces = [(a, a + piece) for start, end in runs for a in range(start, end, piece)]
        tail = min(self.window, piece)
        send = torch.cat([torch.arange(end - tail, end) for _, end in pieces]).to(pos.device)
        gathered = pos.new_empty(send.numel() * self.cp_mesh.size())
        dist.all_gather_into_tensor(gathered, pos[send], group=group)
        halos, key_pos = [], []
        for start, end in pieces:
            first = int(pos[start])
            halo = ((gathered >= first - self.window) & (gathered < first)).nonzero().flatten()
            if halo.numel() != min(self.window, first):  # cannot happen with equal pieces
                raise ConfigError(f"the sliding-window halo of position {first} is incomplete")
            halos.append(halo)
            key_pos.append(torch.cat((gathered[halo], pos[start:end])))
        return pieces, send, halos, key_pos


class HaloAttention:
    """``SlidingWindowAttention.halo_attention``: window attention over [halo | piece] keys."""

    def __init__(self, layout: HaloLayout):
        self.layout = layout

    def __call__(self, q, k, v, positions, window: int, doc_starts=None) -> torch.Tensor:
        """q, k (rotated), v: (B, H, T_local, d); positions (T_local,); doc_starts (B, T_local)
        global document starts of packed documents, or None -> (B, H, T_local, d)."""
        layout, head_dim = self.layout, k.shape[-1]
        tails = torch.cat((k, v), dim=-1)[:, :, layout.send].permute(2, 0, 1, 3).contiguous()
        tails = _all_gather(tails, 0, layout.cp_mesh).permute(1, 2, 0, 3)
        outs = []
        for (start, end), halo, key_pos in zip(layout.pieces, layout.halo, layout.key_pos):
            halo_kv = tails[:, :, halo]
            keys = torch.cat((halo_kv[..., :head_dim], k[:, :, start:end]), dim=2)
            values = torch.cat((halo_kv[..., head_dim:], v[:, :, start:end]), dim=2)
            query_pos = positions[start:end].long()[:, None]
            visible = (key_pos <= query_pos) & (key_pos >= query_pos - window)
            if doc_starts is not None:  # (B, 1, piece, keys): per sequence
                visible = (visible & (key_pos >= doc_starts[:, start:end, None]))[:, None]
            outs.append(
                F.scaled_dot_product_attention(q[:, :, start:end], keys, values, attn_mask=visible)
            )
        return torch.cat(outs, dim=2)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Make the mixers of ``model`` exchange what they need over ``cp_mesh``, in place.

    RAT layers all-gather chunk summaries; sliding-window layers all-gather their halo tails.
    """
    windows = set()
    for layer_id, block in model.layers.items():
        mixer = block.mixer
        if isinstance(mixer, SlidingWindowAttention) and mixer.window is None:
            raise ConfigError(
                f"context parallel supports RAT and sliding-window layers only: layer {layer_id} "
                "is full attention, which would need ring attention (torch's SDPA context "
                "parallel, not wired for this model): use context_parallel_degree 1 for the "
                "attention baselines"
            )
        if isinstance(mixer, SlidingWindowAttention):
            windows.add(mixer.window)
    model.register_forward_pre_hook(
        PieceAlignmentCheck(model.args.chunk_size, cp_mesh.size()), with_kwargs=True
    )
    exchange = SummaryAllGather(cp_mesh)
    layouts = {w: HaloLayout(cp_mesh, w) for w in sorted(windows)}
    for layout in layouts.values():
        model.register_forward_pre_hook(layout, with_kwargs=True)
    for block in model.layers.values():
        if isinstance(block.mixer, RAT):
            block.mixer.summary_exchange = exchange
        else:
            block.mixer.halo_attention = HaloAttention(layouts[block.mixer.window])

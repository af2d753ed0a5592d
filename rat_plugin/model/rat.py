"""The RAT token mixer (docs/design.md section 1)."""

import torch
from torch import nn

from rat_plugin.model.args import RATModelArgs
from rat_plugin.model.cache import RATCache
from rat_plugin.ops.chunk_scan import accumulation_dtype
from rat_plugin.ops.decode_attention import decode_attention
from rat_plugin.ops.dispatch import select_kernels
from rat_plugin.ops.mixing import SummaryExchange, rat_mixing, rat_mixing_with_states
from rat_plugin.ops.rope import apply_rope, rope_angles


class RAT(nn.Module):
    """Gated recurrence inside chunks, softmax attention over chunk summaries across them.

    Input u = RMSNorm(x) (batch, seq, dim); output W_o(z * o), the residual is added by the block.
    """

    def __init__(self, args: RATModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_groups = args.n_groups
        self.chunk_size = args.chunk_size
        self.rope_base = args.rope_base
        self.kernel_choice = (args.scan_kernel, args.attention_kernel)
        dim, group_dim = args.dim, args.n_groups * args.head_dim
        self.wq = nn.Linear(dim, group_dim, bias=False)
        self.wk = nn.Linear(dim, group_dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wg = nn.Linear(dim, dim, bias=True)  # forget gate logits, bias b_g
        self.wz = nn.Linear(dim, dim, bias=False)  # output gate logits
        self.wo = nn.Linear(dim, dim, bias=False)
        # Set by the context-parallel plan: gathers chunk summaries across the CP group.
        self.summary_exchange: SummaryExchange | None = None

    def init_weights(self, std: float = 0.02) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wg, self.wz, self.wo):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        # b_g = log(Uniform(1, L - 1)): sigmoid(b_g) spans memory lengths 1..L-1. For L <= 2 the
        # range is empty, so b_g = 0 (gate 1/2).
        high = float(max(self.chunk_size - 1, 1))
        with torch.no_grad():
            self.wg.bias.uniform_(1.0, high).log_()

    def forward(
        self,
        u: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: RATCache | None = None,
        doc_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = u.shape
        v = self.wv(u).view(batch, seq_len, -1, self.head_dim)  # (B, T, H, d), H local under TP
        heads = v.shape[2]
        if heads % self.n_groups:
            raise ValueError(
                f"{heads} local heads is not a multiple of n_groups={self.n_groups}: the tensor "
                "parallel degree must divide n_heads // n_groups"
            )
        # Head h uses group h mod G (tiling).
        repeats = heads // self.n_groups
        q = self.wq(u).view(batch, seq_len, self.n_groups, self.head_dim).repeat(1, 1, repeats, 1)
        k = self.wk(u).view(batch, seq_len, self.n_groups, self.head_dim).repeat(1, 1, repeats, 1)
        # The gate g in [0, 1] multiplies the running state L times per chunk: fp32 at least
        # (accumulation_dtype), fp64 for an fp64 model.
        forget_gate = torch.sigmoid(self.wg(u).to(accumulation_dtype(u.dtype)))
        forget_gate = forget_gate.view(batch, seq_len, heads, self.head_dim)
        output_gate = torch.sigmoid(self.wz(u))
        kernels = select_kernels(u.device, *self.kernel_choice, head_dim=self.head_dim)

        if cache is not None and cache.filled:
            out = self._decode_step(q, k, v, forget_gate, cache)
        elif cache is not None:
            out, k_state, v_state = rat_mixing_with_states(
                q, k, v, forget_gate, self.chunk_size, self.rope_base, kernels=kernels
            )
            cache.fill(k_state, v_state)
        else:
            chunk_ids = None
            if positions is not None:
                chunk_ids = (positions[0] if positions.dim() == 2 else positions).long()
                chunk_ids = chunk_ids // self.chunk_size
            first_chunks = None if doc_starts is None else doc_starts // self.chunk_size
            out = rat_mixing(
                q, k, v, forget_gate, self.chunk_size, self.rope_base, chunk_ids=chunk_ids,
                summary_exchange=self.summary_exchange, kernels=kernels, first_chunks=first_chunks,
            )
        return self.wo(output_gate * out.reshape(batch, seq_len, -1))

    def new_cache(self, lengths: torch.Tensor, max_len: int) -> RATCache:
        return RATCache(lengths, max_len, self.chunk_size, self.rope_base, self.wv.weight.dtype)

    def _decode_step(self, q, k, v, forget_gate, cache: RATCache) -> torch.Tensor:
        if q.shape[1] != 1:
            raise ValueError(f"decode steps take one token per sequence, got {q.shape[1]}")
        chunk = cache.update(k[:, 0], v[:, 0], forget_gate[:, 0])  # (B,)
        acc = accumulation_dtype(q.dtype)
        cos, sin = rope_angles(chunk, self.head_dim, self.rope_base, acc)
        q_rot = apply_rope(q[:, 0].to(acc), cos[:, None], sin[:, None]).to(cache.dtype)
        # Slots 0..chunk: the earlier chunks' summaries, then the token's own running state.
        out = decode_attention(
            q_rot, cache.keys, cache.values, chunk + 1, scale=self.head_dim**-0.5
        )  # (B, H, d)
        return out[:, None].to(q.dtype)

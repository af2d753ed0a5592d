"""Decoding caches (DESIGN.md section 3), one per layer, for batches of mixed prompt lengths.

A cache is created empty with each sequence's prompt length, filled by the layer's prefill
forward, then advanced by one token per decode step. Positions are per sequence.
"""

import torch

from rat_plugin.ops.rope import apply_rope, rope_angles


def _grow(buffer: torch.Tensor, capacity: int, dim: int, fill: float = 0.0) -> torch.Tensor:
    """``buffer`` extended along ``dim`` to hold at least ``capacity`` entries (doubling)."""
    size = buffer.shape[dim]
    if capacity <= size:
        return buffer
    shape = list(buffer.shape)
    shape[dim] = max(capacity, 2 * size) - size
    return torch.cat((buffer, buffer.new_full(shape, fill)), dim=dim)


def _check_lengths(lengths: torch.Tensor, seq_len: int) -> None:
    if lengths.min() < 1 or lengths.max() > seq_len:
        raise ValueError(
            f"prompt lengths must be in [1, {seq_len}], got {lengths.tolist()}: "
            "every prompt needs at least one token"
        )


class RATCache:
    """Chunk summaries (B, H, num_chunks, d), keys rotated, plus the running state (B, H, d).

    Per sequence this holds 2 * H * d values per closed chunk and 2 * H * d fp32 values of
    running state: about chunk_size times less than an attention KV cache.
    """

    def __init__(self, lengths: torch.Tensor, chunk_size: int, rope_base: float, dtype: torch.dtype):
        self.lengths = lengths.long()
        self.chunk_size = chunk_size
        self.rope_base = rope_base
        self.dtype = dtype
        self.keys = self.values = None  # summaries
        self.state_k = self.state_v = None  # running state, fp32 (fp64 for fp64 models)
        self.pos: torch.Tensor | None = None  # tokens seen per sequence

    @property
    def filled(self) -> bool:
        return self.pos is not None

    def fill(self, k_state: torch.Tensor, v_state: torch.Tensor) -> None:
        """From the prefill's running states (B, T, H, d), kt unrotated."""
        batch, seq_len, _, head_dim = k_state.shape
        lengths = self.lengths.to(k_state.device)
        _check_lengths(lengths, seq_len)
        last = slice(self.chunk_size - 1, None, self.chunk_size)
        num_chunks = seq_len // self.chunk_size
        cos, sin = rope_angles(
            torch.arange(num_chunks, device=k_state.device), head_dim, self.rope_base, k_state.dtype
        )
        keys = apply_rope(k_state[:, last], cos[:, None], sin[:, None])
        # Slots past a sequence's own closed chunks hold padding; decode masks them by position.
        # Contiguous (B, H, N, d): a transposed view would be copied again at every decode step.
        self.keys = keys.transpose(1, 2).to(self.dtype).contiguous()
        self.values = v_state[:, last].transpose(1, 2).to(self.dtype).contiguous()
        rows = torch.arange(batch, device=k_state.device)
        self.state_k = k_state[rows, lengths - 1]
        self.state_v = v_state[rows, lengths - 1]
        self.pos = lengths.clone()

    def update(
        self, k: torch.Tensor, v: torch.Tensor, forget_gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance every sequence by one token: k, v, gate (B, H, d).

        Returns (chunk index (B,), running key rotated by it (B, H, d), running value).
        """
        chunk, offset = self.pos // self.chunk_size, self.pos % self.chunk_size
        chunk_start = (offset == 0)[:, None, None]
        # The chunk that just ended (chunk - 1) becomes a summary.
        closing = chunk_start & (self.pos > 0)[:, None, None]
        slot = (chunk - 1).clamp(min=0)
        capacity = int(slot.max()) + 1
        self.keys = _grow(self.keys, capacity, dim=2)
        self.values = _grow(self.values, capacity, dim=2)
        head_dim = k.shape[-1]
        cos, sin = rope_angles(slot, head_dim, self.rope_base, self.state_k.dtype)
        closed_k = apply_rope(self.state_k, cos[:, None], sin[:, None]).to(self.dtype)
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[rows, :, slot] = torch.where(closing, closed_k, self.keys[rows, :, slot])
        self.values[rows, :, slot] = torch.where(
            closing, self.state_v.to(self.dtype), self.values[rows, :, slot]
        )
        # State resets at a chunk start, then g * state + (1 - g) * x.
        gate = forget_gate.to(self.state_k.dtype)
        self.state_k = torch.lerp(k.to(gate.dtype), self.state_k.masked_fill(chunk_start, 0), gate)
        self.state_v = torch.lerp(v.to(gate.dtype), self.state_v.masked_fill(chunk_start, 0), gate)
        self.pos = self.pos + 1
        cos, sin = rope_angles(chunk, head_dim, self.rope_base, self.state_k.dtype)
        return chunk, apply_rope(self.state_k, cos[:, None], sin[:, None]), self.state_v

    def nbytes_per_sequence(self) -> int:
        """Bytes one sequence needs at its current position (closed summaries + running state)."""
        closed = max(int(self.pos.max()) - 1, 0) // self.chunk_size if self.filled else 0
        heads, head_dim = self.state_k.shape[1:]
        summary = 2 * heads * closed * head_dim * self.dtype.itemsize
        return summary + 2 * heads * head_dim * self.state_k.dtype.itemsize


class KVCache:
    """Rotated keys and values of the last ``window + 1`` tokens (ring buffer), or of all tokens
    when ``window`` is None (the attention baseline)."""

    def __init__(self, lengths: torch.Tensor, window: int | None, dtype: torch.dtype):
        self.lengths = lengths.long()
        self.window = window
        self.dtype = dtype
        self.keys = self.values = None  # (B, H, slots, d)
        self.slot_pos: torch.Tensor | None = None  # (B, slots) token position held, -1 if none
        self.pos: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.pos is not None

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """From the prefill's rotated keys and values (B, T, H, d)."""
        batch, seq_len = k.shape[:2]
        lengths = self.lengths.to(k.device)
        _check_lengths(lengths, seq_len)
        last = lengths[:, None] - 1
        if self.window is None:
            slot_pos = torch.arange(seq_len, device=k.device).expand(batch, seq_len)
            slot_pos = torch.where(slot_pos <= last, slot_pos, -1)
        else:
            slots = torch.arange(self.window + 1, device=k.device)
            # The latest position <= last that lands in each ring slot.
            slot_pos = last - (last - slots) % (self.window + 1)
        rows = torch.arange(batch, device=k.device)[:, None]
        index = slot_pos.clamp(min=0)
        self.keys = k[rows, index].transpose(1, 2).to(self.dtype).contiguous()
        self.values = v[rows, index].transpose(1, 2).to(self.dtype).contiguous()
        self.slot_pos = slot_pos
        self.pos = lengths.clone()

    def update(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store one rotated key/value per sequence (B, H, d); returns the visible slots (B, S)."""
        if self.window is None:
            slot = self.pos
            capacity = int(slot.max()) + 1
            self.keys = _grow(self.keys, capacity, dim=2)
            self.values = _grow(self.values, capacity, dim=2)
            self.slot_pos = _grow(self.slot_pos, capacity, dim=1, fill=-1)
        else:
            slot = self.pos % (self.window + 1)
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[rows, :, slot] = k.to(self.dtype)
        self.values[rows, :, slot] = v.to(self.dtype)
        self.slot_pos[rows, slot] = self.pos
        self.pos = self.pos + 1
        return self.slot_pos >= 0

    def nbytes_per_sequence(self) -> int:
        """Bytes one sequence needs at its current position."""
        seen = int(self.pos.max()) if self.filled else 0
        held = seen if self.window is None else min(seen, self.window + 1)
        heads, _, head_dim = self.keys.shape[1:]
        return 2 * heads * held * head_dim * self.dtype.itemsize

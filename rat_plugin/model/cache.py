"""Decoding caches (docs/design.md section 3), one per layer, for batches of mixed prompt lengths.

A cache is created empty with each sequence's prompt length and the most tokens any sequence
will reach (``max_len``), filled by the layer's prefill forward, then advanced by one token per
decode step. Positions are per sequence.

Buffers are allocated once, at fill, for ``max_len`` tokens and updated in place, and a decode
step reads nothing back to the host: its tensors keep their addresses, so a whole decode step can
be captured in a CUDA graph (``rat_plugin.generate``) or compiled with ``fullgraph=True``. The
slots a token sees are always a prefix of its buffer (see ``rat_plugin.ops.decode_attention``).
"""

import torch

from rat_plugin.ops.rope import apply_rope, rope_angles


class DecodeCache:
    """What every layer cache shares: prompt lengths, capacity, and the host-side step count."""

    def __init__(self, lengths: torch.Tensor, max_len: int):
        self.lengths = lengths.long()
        if self.lengths.numel() == 0 or int(self.lengths.min()) < 1:
            raise ValueError(
                f"prompt lengths must be >= 1, got {self.lengths.tolist()}: every prompt needs "
                "at least one token"
            )
        longest = int(self.lengths.max())
        if max_len < longest:
            raise ValueError(
                f"max_len={max_len} is shorter than the longest prompt ({longest} tokens): "
                "max_len counts prompt plus generated tokens"
            )
        self.max_len = max_len
        self.pos: torch.Tensor | None = None  # (B,) tokens seen per sequence, on the device
        self._longest = longest  # the same, for the longest sequence, on the host (eager only)

    @property
    def filled(self) -> bool:
        return self.pos is not None

    def _check_prefill(self, seq_len: int) -> torch.Tensor:
        if self.filled:
            raise ValueError("this cache is already filled: make new caches for a new prefill")
        if self._longest > seq_len:
            raise ValueError(
                f"prompt lengths {self.lengths.tolist()} exceed the prefill's {seq_len} tokens"
            )
        return self.lengths

    def _reserve_step(self) -> None:
        """Count one decode step; refuse one past max_len. Skipped under torch.compile, and a
        CUDA-graph replay runs no Python at all: there the caller sizes the caches (``generate``
        does)."""
        if torch.compiler.is_compiling():
            return
        if self._longest >= self.max_len:
            raise ValueError(
                f"the cache is full: it holds max_len={self.max_len} tokens per sequence; "
                "create the caches with a larger max_len"
            )
        self._longest += 1

    def make_room(self, tokens: int) -> None:
        """Grow the buffers, to at least twice their length, when ``tokens`` more decode steps
        would not fit: for a caller that cannot know ``max_len`` in advance (a decoding loop
        written against transformers' API). Eager only, between steps: the buffers move."""
        needed = self._longest + tokens
        if needed > self.max_len:
            self._resize(max(needed, 2 * self.max_len))

    def _resize(self, max_len: int) -> None:
        self.max_len = max_len

    def snapshot(self) -> tuple[list[torch.Tensor], int]:
        """What a decode step changes besides the slot it writes (which the next step at the
        same position writes again): for running steps that must not count, as when warming up
        and capturing a CUDA graph."""
        return [t.clone() for t in self._step_tensors()], self._longest

    def restore(self, snapshot: tuple[list[torch.Tensor], int]) -> None:
        """Put back a ``snapshot``, in place."""
        tensors, self._longest = snapshot
        for tensor, saved in zip(self._step_tensors(), tensors):
            tensor.copy_(saved)

    def _step_tensors(self) -> list[torch.Tensor]:
        return [self.pos]


class RATCache(DecodeCache):
    """Per sequence: chunk summaries, then the current chunk's running state, as slots
    (B, H, num_slots, d) of keys (rotated by chunk index) and values; plus the running state in
    fp32 (B, H, d), unrotated, which the recurrence advances.

    Slot c holds chunk c's running state while chunk c is open; when it closes, that final state
    is its summary and stays. A token in chunk c attends to slots 0..c: the summaries of earlier
    chunks and its own state. Per sequence this is 2 * H * d values per chunk so far: about
    chunk_size times less than an attention KV cache.
    """

    def __init__(
        self, lengths: torch.Tensor, max_len: int, chunk_size: int, rope_base: float,
        dtype: torch.dtype,
    ):
        super().__init__(lengths, max_len)
        self.chunk_size = chunk_size
        self.rope_base = rope_base
        self.dtype = dtype
        self.num_slots = -(-max_len // chunk_size)
        self.keys = self.values = None  # (B, H, num_slots, d), dtype
        self.state_k = self.state_v = None  # (B, H, d) fp32 (fp64 for fp64 models)

    def fill(self, k_state: torch.Tensor, v_state: torch.Tensor) -> None:
        """From the prefill's running states (B, T, H, d), kt unrotated."""
        batch, seq_len, heads, head_dim = k_state.shape
        lengths = self._check_prefill(seq_len).to(k_state.device)
        shape = (batch, heads, self.num_slots, head_dim)
        self.keys = k_state.new_zeros(shape, dtype=self.dtype)
        self.values = k_state.new_zeros(shape, dtype=self.dtype)
        closed = seq_len // self.chunk_size
        last = slice(self.chunk_size - 1, closed * self.chunk_size, self.chunk_size)
        cos, sin = rope_angles(
            torch.arange(closed, device=k_state.device), head_dim, self.rope_base, k_state.dtype
        )
        # Chunks past a sequence's own prompt hold padding: masked, then rewritten when reached.
        summary_k = apply_rope(k_state[:, last], cos[:, None], sin[:, None])  # (B, N, H, d)
        self.keys[:, :, :closed] = summary_k.transpose(1, 2)
        self.values[:, :, :closed] = v_state[:, last].transpose(1, 2)
        rows = torch.arange(batch, device=k_state.device)
        self.state_k = k_state[rows, lengths - 1]
        self.state_v = v_state[rows, lengths - 1]
        self.pos = lengths.clone()
        self._write_state(rows, (lengths - 1) // self.chunk_size)

    def update(self, k: torch.Tensor, v: torch.Tensor, forget_gate: torch.Tensor) -> torch.Tensor:
        """Advance every sequence by one token: k, v, gate (B, H, d).

        Returns each sequence's chunk index (B,); its slots 0..chunk are what the token sees.
        """
        self._reserve_step()
        chunk, offset = self.pos // self.chunk_size, self.pos % self.chunk_size
        # The state resets at a chunk start, then g * state + (1 - g) * x. The chunk that just
        # ended keeps its slot: its final state is the summary.
        chunk_start = (offset == 0)[:, None, None]
        gate = forget_gate.to(self.state_k.dtype)
        for state, x in ((self.state_k, k), (self.state_v, v)):
            state.copy_(torch.lerp(x.to(gate.dtype), state.masked_fill(chunk_start, 0), gate))
        self._write_state(torch.arange(k.shape[0], device=k.device), chunk)
        self.pos.add_(1)
        return chunk

    def _write_state(self, rows: torch.Tensor, chunk: torch.Tensor) -> None:
        """Store each sequence's running state, the key rotated by its chunk, in slot ``chunk``."""
        cos, sin = rope_angles(chunk, self.state_k.shape[-1], self.rope_base, self.state_k.dtype)
        key = apply_rope(self.state_k, cos[:, None], sin[:, None])
        self.keys[rows, :, chunk] = key.to(self.dtype)
        self.values[rows, :, chunk] = self.state_v.to(self.dtype)

    def _step_tensors(self) -> list[torch.Tensor]:
        return [self.pos, self.state_k, self.state_v]

    def _resize(self, max_len: int) -> None:
        super()._resize(max_len)
        slots = -(-max_len // self.chunk_size)
        if self.filled:  # new slots at the end: every chunk keeps its slot
            self.keys, self.values = (_pad_slots(t, slots) for t in (self.keys, self.values))
        self.num_slots = slots

    def nbytes_per_sequence(self) -> int:
        """Bytes one sequence needs at its current position: slots of the chunks so far and the
        fp32 running state."""
        seen = int(self.pos.max()) if self.filled else 0
        chunks = -(-seen // self.chunk_size)
        heads, head_dim = self.state_k.shape[1:]
        slots = 2 * heads * chunks * head_dim * self.dtype.itemsize
        return slots + 2 * heads * head_dim * self.state_k.dtype.itemsize


class KVCache(DecodeCache):
    """Rotated keys and values (B, H, slots, d) of the last ``window + 1`` tokens (a ring
    buffer), or of all ``max_len`` tokens when ``window`` is None (the attention baseline).

    Position p lives in slot p % slots. Slots fill in order, so the ones holding tokens are a
    prefix (all of them once the ring is full), and the window is exactly what the ring holds.
    """

    def __init__(
        self, lengths: torch.Tensor, max_len: int, window: int | None, dtype: torch.dtype
    ):
        super().__init__(lengths, max_len)
        self.window = window
        self.dtype = dtype
        self.num_slots = max_len if window is None else min(window + 1, max_len)
        self.keys = self.values = None

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """From the prefill's rotated keys and values (B, T, H, d)."""
        batch, seq_len = k.shape[:2]
        lengths = self._check_prefill(seq_len).to(k.device)
        last = lengths[:, None] - 1
        slots = torch.arange(self.num_slots, device=k.device)
        # The latest position <= last that lands in each slot (negative: none yet).
        slot_pos = last - (last - slots) % self.num_slots
        rows = torch.arange(batch, device=k.device)[:, None]
        index = slot_pos.clamp(min=0)
        self.keys = k[rows, index].transpose(1, 2).to(self.dtype).contiguous()
        self.values = v[rows, index].transpose(1, 2).to(self.dtype).contiguous()
        self.pos = lengths.clone()

    def update(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store one rotated key/value per sequence (B, H, d); returns how many slots (a prefix)
        each sequence's new token sees (B,)."""
        self._reserve_step()
        slot = self.pos % self.num_slots
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[rows, :, slot] = k.to(self.dtype)
        self.values[rows, :, slot] = v.to(self.dtype)
        self.pos.add_(1)
        return self.pos.clamp(max=self.num_slots)

    def _resize(self, max_len: int) -> None:
        super()._resize(max_len)
        slots = max_len if self.window is None else min(self.window + 1, max_len)
        # A ring smaller than window + 1 has never wrapped (it held max_len tokens at most), so
        # position p stays in slot p.
        if self.filled:
            self.keys, self.values = (_pad_slots(t, slots) for t in (self.keys, self.values))
        self.num_slots = slots

    def nbytes_per_sequence(self) -> int:
        """Bytes one sequence needs at its current position."""
        seen = int(self.pos.max()) if self.filled else 0
        held = seen if self.window is None else min(seen, self.window + 1)
        heads, _, head_dim = self.keys.shape[1:]
        return 2 * heads * held * head_dim * self.dtype.itemsize


def _pad_slots(buffer: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, H, slots so far, d) -> (B, H, slots, d), the new slots zero."""
    return torch.nn.functional.pad(buffer, (0, 0, 0, slots - buffer.shape[2]))

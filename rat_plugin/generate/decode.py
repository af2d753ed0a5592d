"""Batched generation: one prefill forward, then one cached decode step per new token."""

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from rat_plugin.generate.arguments import (
    check_count,
    check_prompts,
    check_seed,
    check_stop_tokens,
    check_temperature,
    check_top_k,
    check_top_p,
)
from rat_plugin.generate.memory import check_cache_fits
from rat_plugin.generate.sampling import sample
from rat_plugin.generate.step import DecodeStep
from rat_plugin.model import RATModel


@dataclass
class GenerationStats:
    batch: int
    prompt_tokens: int  # summed over the batch
    new_tokens: int  # summed over the batch, stop tokens included
    prefill_s: float
    decode_s: float
    cache_bytes_per_sequence: int  # all layers, at the longest sequence's last position

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prefill included."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second of the decode steps alone (the first token is the prefill's)."""
        return max(self.new_tokens - self.batch, 0) / max(self.decode_s, 1e-9)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, ending with the stop token if one came
    stats: GenerationStats
    logits: list[torch.Tensor] | None = None  # per prompt (new tokens, vocab) fp32, on request


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: RATModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Iterable[int] = (),
    return_logits: bool = False,
    on_token: Callable[[int, list[int], list[bool]], None] | None = None,
    cuda_graph: bool = False,
) -> GenerationResult:
    """Continue every prompt (a list of token ids; lengths may differ) by up to
    ``max_new_tokens`` tokens (>= 1), not capped at the training length: a count whose decode
    caches would not fit the device's free memory is refused.

    temperature 0 is greedy; otherwise sample with optional top-k / top-p, reproducibly when
    ``seed`` is given. A sequence stops after emitting one of ``stop_tokens``. ``on_token(step,
    tokens, active)`` is called after each step with every sequence's new token and whether that
    sequence was still generating (for streaming). ``cuda_graph`` (CUDA only) captures the
    decode step once and replays it for every token (see ``DecodeStep``).
    """
    prompts = check_prompts(prompts, model.args.vocab_size)
    max_new_tokens = check_count(max_new_tokens)
    temperature = check_temperature(temperature)
    top_k, top_p = check_top_k(top_k), check_top_p(top_p)
    seed, stop_tokens = check_seed(seed), check_stop_tokens(stop_tokens)
    weight = model.tok_embeddings.weight
    device = weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    check_cache_fits(model.args, batch, longest, max_new_tokens, weight.dtype, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    lengths = torch.tensor([len(p) for p in prompts], device=device)
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        padded[i, : len(prompt)] = torch.tensor(prompt, device=device)

    _sync(device)
    start = time.perf_counter()
    # The last new token is returned, never fed back: the caches hold one token less.
    caches = model.new_caches(lengths, max_len=longest + max(max_new_tokens - 1, 0))
    logits = model(padded, caches=caches, logits_at=lengths - 1).float()
    _sync(device)
    prefill_s = time.perf_counter() - start

    tokens, step_logits = [], []
    active = torch.ones(batch, dtype=torch.bool, device=device)
    emitted = torch.zeros(batch, dtype=torch.long, device=device)
    start = time.perf_counter()
    decode_step = DecodeStep(model, caches, cuda_graph) if max_new_tokens > 1 else None
    for step in range(max_new_tokens):
        next_token = sample(logits, temperature, top_k, top_p, generator)
        tokens.append(next_token)
        if return_logits:
            step_logits.append(logits)
        emitted += active
        if on_token is not None:
            on_token(step, next_token.tolist(), active.tolist())
        active = active & ~torch.isin(next_token, stop)
        # Without stop tokens nothing is read back to the host between steps.
        if step == max_new_tokens - 1 or (stop.numel() and not active.any()):
            break
        logits = decode_step(next_token)
    _sync(device)
    decode_s = time.perf_counter() - start
    new_tokens = int(emitted.sum())

    out = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in prompts]
    result_tokens = [_cut(seq, set(stop.tolist())) for seq in out]
    result_logits = None
    if return_logits:
        stacked = torch.stack(step_logits, dim=1) if step_logits else None
        result_logits = [
            stacked[i, : len(seq)] if stacked is not None else torch.empty(0)
            for i, seq in enumerate(result_tokens)
        ]
    stats = GenerationStats(
        batch=batch,
        prompt_tokens=int(lengths.sum()),
        new_tokens=new_tokens,
        prefill_s=prefill_s,
        decode_s=decode_s,
        cache_bytes_per_sequence=sum(cache.nbytes_per_sequence() for cache in caches),
    )
    return GenerationResult(result_tokens, stats, result_logits)


def _cut(seq: list[int], stop: set[int]) -> list[int]:
    """``seq`` up to and including its first stop token."""
    for i, token in enumerate(seq):
        if token in stop:
            return seq[: i + 1]
    return seq

"""One decode step of the whole model, optionally captured once in a CUDA graph and replayed."""

from collections.abc import Callable

import torch

from rat_plugin.model import RATModel

# Eager steps run on a side stream before capture (lazy cuBLAS / allocator set-up).
WARMUP_STEPS = 2


def capture_cuda_graph(
    run: Callable[[], None], restore: Callable[[], None], device: torch.device
) -> Callable[[], None]:
    """Warm ``run`` up, capture it in a CUDA graph and return the graph's replay.

    ``restore`` puts back the state ``run`` advanced, after every warm-up step and after the
    capture, so neither counts as a step.
    """
    if device.type != "cuda":
        raise ValueError(
            f"CUDA graphs need the model on a CUDA device (it is on {device.type}); "
            "decode without CUDA graphs (cuda_graph=False, no --cuda-graph)"
        )
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                run()
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        restore()
    return graph.replay


class DecodeStep:
    """next tokens (B,) -> fp32 logits (B, vocab) of the position after them; advances ``caches``.

    The caches must be filled (prefilled) and sized for every step that will follow. Inputs
    and outputs live in fixed buffers; with ``cuda_graph`` (CUDA only) the step is captured once
    and each call is a single graph launch instead of one launch per kernel.
    """

    def __init__(self, model: RATModel, caches: list, cuda_graph: bool = False):
        if not caches or not caches[0].filled:
            raise ValueError("DecodeStep needs caches filled by a prefill forward")
        device = model.tok_embeddings.weight.device
        self.model, self.caches = model, caches
        batch = caches[0].pos.shape[0]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, model.args.vocab_size, device=device)
        self._replay = self._run
        if cuda_graph:
            saved = [cache.snapshot() for cache in caches]

            def restore() -> None:
                for cache, snapshot in zip(caches, saved):
                    cache.restore(snapshot)

            self._replay = capture_cuda_graph(self._run, restore, device)

    def __call__(self, next_token: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(next_token.view(-1, 1))
        self._replay()
        return self.logits.clone()

    def _run(self) -> None:
        self.logits.copy_(self.model(self.tokens, caches=self.caches)[:, 0])

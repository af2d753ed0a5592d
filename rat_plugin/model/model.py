"""RAT / RAT-SWA / attention language models (docs/design.md section 2)."""

import torch
import torch.nn.functional as F
from torch import nn

from rat_plugin.model.args import RATModelArgs
from rat_plugin.model.rat import RAT
from rat_plugin.model.swa import SlidingWindowAttention

INIT_STD = 0.02


def build_mixer(layer_id: int, args: RATModelArgs) -> nn.Module:
    kind = args.layer_mixer(layer_id)
    if kind == "rat":
        return RAT(args)
    window = args.swa_window if kind == "swa" else None
    return SlidingWindowAttention(
        args.dim, args.n_heads, window, args.rope_base, (args.scan_kernel, args.attention_kernel)
    )


class FeedForward(nn.Module):
    """W_2 GELU(W_1 x), exact GELU, no bias."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))

    def init_weights(self, std: float = INIT_STD) -> None:
        for linear in (self.w1, self.w2):
            nn.init.normal_(linear.weight, mean=0.0, std=std)


class TransformerBlock(nn.Module):
    """x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x))."""

    def __init__(self, layer_id: int, args: RATModelArgs):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mixer = build_mixer(layer_id, args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        doc_starts: torch.Tensor | None = None,
    ):
        x = x + self.mixer(self.mixer_norm(x), positions, cache, doc_starts)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self) -> None:
        self.mixer_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.mixer.init_weights(INIT_STD)
        self.feed_forward.init_weights(INIT_STD)


class RATModel(nn.Module):
    """Token embedding (tied to the LM head), blocks, final RMSNorm.

    Attribute names follow torchtitan's llama3 (tok_embeddings, layers, norm, output) so its
    FSDP / compile / activation-checkpointing helpers apply.
    """

    def __init__(self, args: RATModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Init of docs/design.md section 2. There are no buffers; buffer_device is the
        torchtitan hook."""
        # Building on meta then to_empty() unties shared parameters: tie again.
        self.output.weight = self.tok_embeddings.weight
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=INIT_STD)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list | None = None,
        logits_at: torch.Tensor | None = None,
        document_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab).

        positions: global token positions (batch, seq) under context parallel.
        caches: from ``new_caches``; the first call with them prefills, later calls decode one
        token per sequence.
        logits_at: (batch,) the one position per sequence whose logits are wanted, giving
        (batch, vocab): a long prefill then never builds (batch, seq, vocab) logits.
        document_starts: (batch, full seq) for packed documents, the global position of each
        token's document start; every document starts on a chunk boundary (document-aware
        training, docs/design.md section 7). No token then sees another document. Under context
        parallel it covers the whole sequence and ``positions`` picks the local tokens.
        """
        if caches is not None and not caches[0].filled:
            self._check_tokens(tokens)
        doc_starts = None
        if document_starts is not None:
            doc_starts = self._local_document_starts(document_starts, positions, caches)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, positions, None if caches is None else caches[i], doc_starts)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]
        return self.output(self.norm(h))

    def new_caches(self, lengths: torch.Tensor, max_len: int) -> list:
        """Empty per-layer decode caches for prompts of the given lengths (batch,), holding up
        to ``max_len`` tokens (prompt plus generated) per sequence."""
        return [layer.mixer.new_cache(lengths, max_len) for layer in self.layers.values()]

    def _local_document_starts(self, document_starts, positions, caches) -> torch.Tensor:
        """The document starts of this rank's tokens, checked on the device (no host sync)."""
        if caches is not None:
            raise ValueError("document_starts is for training forwards, not decoding caches")
        starts = document_starts.long()
        if positions is not None:
            index = positions.long().expand(starts.shape[0], -1)
            starts = starts.gather(1, index)
        if not torch.compiler.is_compiling():
            torch._assert_async(
                (starts % self.args.chunk_size == 0).all(),
                f"document_starts: packed documents must start on chunk boundaries (multiples "
                f"of chunk_size={self.args.chunk_size}); pack them with "
                "rat_plugin.data.packing",
            )
        return starts

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.args.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.args.vocab_size}), got "
                f"[{int(tokens.min())}, {int(tokens.max())}]: is the tokenizer the model's?"
            )

"""RATForCausalLM: the project's ``RATModel`` behind transformers' ``PreTrainedModel`` and
``generate()``, decoding with RAT's own caches (one prefill, then one token per forward)."""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from rat_plugin.folder import EMBEDDING, HF_PREFIX, TIED_HEAD
from rat_plugin.hf.configuration import RATConfig
from rat_plugin.model import RATModel

DECODING_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class RATGenerationCache:
    """What ``generate()`` carries between forward calls: the per-layer RAT / window caches
    (``RATModel.new_caches``), made at the prefill for at most ``max_len`` tokens per
    sequence."""

    is_compileable = False  # generate() asks before it would compile the forward
    is_croppable = False

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.layers: list | None = None
        self.tokens = 0  # tokens fed so far (the longest sequence's)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens


def left_to_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(tokens right-padded, lengths) of a batch that generate() left-pads."""
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        return input_ids, torch.full((batch,), seq_len, device=input_ids.device)
    lengths = attention_mask.long().sum(dim=1)
    positions = torch.arange(seq_len, device=input_ids.device)
    left_padded = positions[None] >= (seq_len - lengths)[:, None]
    if not torch.equal(attention_mask.bool(), left_padded) or int(lengths.min()) < 1:
        raise ValueError(
            "attention_mask must be left padding (zeros, then at least one 1 per row): "
            "tokenize with padding_side='left'"
        )
    shift = (positions[None] + (seq_len - lengths)[:, None]) % seq_len
    return input_ids.gather(1, shift), lengths


class RATForCausalLM(PreTrainedModel, GenerationMixin):
    """A RAT language model for transformers. ``self.model`` is the project's ``RATModel``
    (weights named ``model.<RATModel name>``, the head tied to the embedding)."""

    config_class = RATConfig
    base_model_prefix = HF_PREFIX.rstrip(".")
    _tied_weights_keys = {HF_PREFIX + TIED_HEAD: HF_PREFIX + EMBEDDING}
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: RATConfig):
        super().__init__(config)
        self.model = RATModel(config.to_args())
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, RATModel):
            module.init_weights()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # RAT keeps its own caches (RATGenerationCache)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        if generation_mode not in DECODING_MODES:
            raise ValueError(
                f"generation mode {generation_mode.value} is not supported by RAT models: use "
                "greedy decoding or sampling (num_beams=1, no assistant model)"
            )
        if model_kwargs.get("past_key_values") is not None:
            raise ValueError("RAT models make their own decoding cache: pass no past_key_values")
        if generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = RATGenerationCache(max_cache_length)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RATGenerationCache | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the next-token loss with ``labels``, -100 ignored) of ``input_ids``.

        With a ``RATGenerationCache`` (what ``generate()`` passes) the first call prefills a
        left-padded batch and returns each sequence's last logits (batch, 1, vocab); later calls
        decode one token per sequence. Positions follow the tokens (no ``position_ids``), and
        ``inputs_embeds`` are not supported; other keyword arguments (``use_cache``,
        ``return_dict``, ...) change nothing.
        """
        unsupported = [k for k in ("position_ids", "inputs_embeds") if kwargs.get(k) is not None]
        if unsupported:
            raise ValueError(f"RAT models take input_ids, not {', '.join(unsupported)}")
        cache = past_key_values
        if cache is not None and labels is not None:
            raise ValueError("labels need a forward without a decoding cache")
        if cache is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError(
                    "padding without a cache is not supported: run sequences of one length, "
                    "or use generate()"
                )
            logits = self.model(input_ids)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        elif cache.layers is None:
            tokens, lengths = left_to_right_padding(input_ids, attention_mask)
            cache.layers = self.model.new_caches(lengths, cache.max_len)
            logits = self.model(tokens, caches=cache.layers, logits_at=lengths - 1)[:, None]
        else:
            logits = self.model(input_ids, caches=cache.layers)
        if cache is not None:
            cache.tokens += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

"""RATForCausalLM: the project's ``RATModel`` behind transformers' ``PreTrainedModel`` and
``generate()``, decoding with RAT's own caches (one prefill, then one token per forward)."""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from rat_plugin.folder import (
    CONFIG_FILE,
    CONFIG_RECORD,
    EMBEDDING,
    HF_PREFIX,
    TIED_HEAD,
    WEIGHTS_FILE,
    listing,
    warn_config_edits,
    weight_problem,
)
from rat_plugin.hf.configuration import RATConfig, model_dtype
from rat_plugin.model import RATModel

DECODING_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
INDEX_FILE = "model.safetensors.index.json"  # sharded weights (torchtitan's HF saves)


class RATGenerationCache:
    """What ``past_key_values`` carries between forward calls: the per-layer RAT / window
    caches (``RATModel.new_caches``), made at the prefill. ``generate()`` makes it for at most
    ``max_len`` tokens per sequence and left-padded prompts; ``use_cache=True`` makes it with
    ``max_len`` None: room for the prompt, grown as decode steps need."""

    is_compileable = False  # generate() asks before it would compile the forward
    is_croppable = False

    def __init__(self, max_len: int | None = None, left_padding: bool = False):
        self.max_len = max_len
        self.left_padding = left_padding
        self.layers: list | None = None
        self.tokens = 0  # tokens fed so far (the longest sequence's)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens


def padding_starts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   left_only: bool) -> tuple[torch.Tensor, ...]:
    """(start, length) of each row's tokens: one run of 1s, after the padding (left padding,
    what generate() makes) or, unless ``left_only``, before it or on both sides."""
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        starts = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        return starts, torch.full_like(starts, seq_len)
    mask = attention_mask.bool()
    lengths = mask.long().sum(dim=1)
    positions = torch.arange(seq_len, device=mask.device)
    starts = seq_len - lengths if left_only else mask.long().argmax(dim=1)
    expected = (positions[None] >= starts[:, None]) & (positions[None] < (starts + lengths)[:, None])
    if not torch.equal(mask, expected) or int(lengths.min()) < 1:
        raise ValueError(
            "attention_mask must be left padding (zeros, then at least one 1 per row): "
            "tokenize with padding_side='left'" if left_only else
            "attention_mask must hold one run of 1s per row (left or right padding)"
        )
    return starts, lengths


def rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of ``x`` (batch, seq, ...) moved ``shift[b]`` positions to the left, cyclically."""
    seq_len = x.shape[1]
    index = (torch.arange(seq_len, device=x.device)[None] + shift[:, None]) % seq_len
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand_as(x))


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained`` with the checks of loading a standalone folder:
        weights that do not fit config.json, and non-finite or absurd weights (named with value
        and position), are refused in one line; config.json fields edited since the export
        (chunk size, window, RoPE base leave no trace in the weights) give a
        ConfigMismatchWarning. ``dtype`` may be one of our names (fp32, bf16, fp16)."""
        if "dtype" in kwargs and kwargs["dtype"] != "auto":
            kwargs["dtype"] = model_dtype(kwargs["dtype"])
        wanted = kwargs.pop("output_loading_info", False)
        resized = kwargs.pop("ignore_mismatched_sizes", False)  # re-initialised on purpose
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True,
            ignore_mismatched_sizes=True, **kwargs
        )
        model._check_loaded(pretrained_model_name_or_path, info, resized)
        return (model, info) if wanted else model

    def _check_loaded(self, source, info: dict, resized: bool) -> None:
        where = Path(source) if isinstance(source, (str, os.PathLike)) else source
        wrong = [] if resized else [f"{k} {tuple(stored)} != {tuple(built)}"
                                    for k, stored, built in info.get("mismatched_keys", ())]
        problems = [f"{kind.replace('_', ' ')}: {listing(str(k) for k in info[kind])}"
                    for kind in ("missing_keys", "unexpected_keys") if info.get(kind)]
        if wrong:
            problems.append(f"shape mismatches (weights != config): {listing(wrong, 6)}")
        if problems:
            raise ValueError(f"the weights of {where} do not fit its {CONFIG_FILE} "
                             f"({'; '.join(problems)}): export it again")
        state = {HF_PREFIX + k: v for k, v in self.model.state_dict().items() if k != TIED_HEAD}
        problem = weight_problem(state)
        if problem:
            raise ValueError(f"{where}: {problem}: the weights are corrupt; export it again "
                             "from a good checkpoint")
        if isinstance(where, Path) and where.is_dir():
            warn_config_edits(self.config.folder_config(), exported_record(where),
                              where / CONFIG_FILE, stacklevel=4)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``; the copy of an export loaded through rat_plugin
        also gets the generated code its config's ``auto_map`` names (transformers copies the
        code of a model loaded with ``trust_remote_code`` itself)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is None and getattr(self.config, "auto_map", None):
            from rat_plugin.hf import remote_code

            remote_code.write(Path(save_directory))

    def _initialize_weights(self, module, is_custom_code: bool = False):
        """``RATModel.init_weights`` on a new model (``from_config``, ``RATForCausalLM(config)``),
        never over loaded weights. transformers would skip it: RATModel holds no parameter of
        its own, so its check "all own parameters initialised" holds trivially."""
        if isinstance(module, RATModel):
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.init_weights()
            module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    def set_input_embeddings(self, embeddings: torch.nn.Embedding) -> None:
        """For ``resize_token_embeddings`` (which then ties the head to it again)."""
        self.model.tok_embeddings = embeddings
        self.model.args.vocab_size = embeddings.num_embeddings

    def set_output_embeddings(self, head: torch.nn.Linear) -> None:
        self.model.output = head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # RAT keeps its own caches (RATGenerationCache)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        if getattr(generation_config, "prefill_chunk_size", None):
            raise ValueError(
                "prefill_chunk_size is not supported by RAT models: the prefill is one forward "
                "(its memory is O(T / chunk_size) per RAT layer already); unset it"
            )
        if generation_mode not in DECODING_MODES:
            raise ValueError(
                f"generation mode {generation_mode.value} is not supported by RAT models: use "
                "greedy decoding or sampling (num_beams=1, no assistant model)"
            )
        if model_kwargs.get("past_key_values") is not None:
            raise ValueError("RAT models make their own decoding cache: pass no past_key_values")
        if generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = RATGenerationCache(max_cache_length, True)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RATGenerationCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the next-token loss with ``labels``, -100 ignored) of ``input_ids``.

        Padded rows (left or right) are computed from their first token, as alone. With
        ``use_cache`` (default ``config.use_cache``; never for a forward with labels) the
        first call also returns the decoding cache in ``past_key_values``, and a call given it
        decodes its tokens one by one per sequence, after each sequence's last token. The
        cache ``generate()`` makes takes left padding and, at the prefill, returns each
        sequence's last logits only (``logits_to_keep=1``). Positions follow the tokens (no
        ``position_ids``), and ``inputs_embeds`` / hidden states / attentions are not
        supported. The loss is the mean over labelled tokens, or their sum divided by
        ``num_items_in_batch`` when the Trainer passes it (gradient accumulation).
        ``return_dict=False`` gives the tuple (loss, logits, past_key_values), Nones left out.
        """
        unsupported = [k for k in ("position_ids", "inputs_embeds") if kwargs.get(k) is not None]
        unsupported += [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)]
        if unsupported:
            raise ValueError(f"RAT models take input_ids and return logits: "
                             f"{', '.join(unsupported)} is not supported")
        cache = past_key_values
        if labels is not None and (use_cache or cache is not None):
            raise ValueError("labels need a forward without a decoding cache: pass "
                             "use_cache=False and no past_key_values")
        if cache is not None and not isinstance(cache, RATGenerationCache):
            raise ValueError(f"past_key_values is a {type(cache).__name__}: pass the "
                             "past_key_values a RAT model returned (its own cache)")
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None
        if cache is None and use_cache:
            cache = RATGenerationCache()
        if cache is None:
            if attention_mask is None or bool(attention_mask.all()):
                logits = self.model(input_ids)
            else:  # each row from its first token, then back in place
                starts, _ = padding_starts(input_ids, attention_mask, left_only=False)
                logits = rotate(self.model(rotate(input_ids, starts)), -starts)
        elif cache.layers is None:
            logits = self._fill_cache(input_ids, attention_mask, cache, logits_to_keep == 1)
        else:
            for layer in cache.layers if cache.max_len is None else ():
                layer.make_room(input_ids.shape[1])
            logits = torch.cat([self.model(input_ids[:, t:t + 1], caches=cache.layers)
                                for t in range(input_ids.shape[1])], dim=1)
        if cache is not None:
            cache.tokens += input_ids.shape[1]
        loss = None
        if labels is not None:
            items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                reduction="mean" if items is None else "sum",
            )
            if items is not None:
                loss = loss / items
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _fill_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache: RATGenerationCache, last_only: bool) -> torch.Tensor:
        """Fill a new cache from the prompts: their logits (batch, seq, vocab) in place, or
        each sequence's last (batch, 1, vocab)."""
        starts, lengths = padding_starts(input_ids, attention_mask, cache.left_padding)
        cache.layers = self.model.new_caches(lengths, cache.max_len or input_ids.shape[1])
        padded = attention_mask is not None and not bool(attention_mask.all())
        tokens = rotate(input_ids, starts) if padded else input_ids
        if last_only:
            return self.model(tokens, caches=cache.layers, logits_at=lengths - 1)[:, None]
        logits = self.model(tokens, caches=cache.layers)
        return rotate(logits, -starts) if padded else logits


def exported_record(folder: Path) -> str | None:
    """The configuration the weights of a transformers folder were written with: in
    model.safetensors' metadata (a ``--to-hf`` export) or in the shard index's (torchtitan's
    HF save); None where there is none (a ``save_pretrained`` copy)."""
    from safetensors import SafetensorError, safe_open

    try:
        if (folder / WEIGHTS_FILE).is_file():
            with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
                return (f.metadata() or {}).get(CONFIG_RECORD)
        if (folder / INDEX_FILE).is_file():
            return json.loads((folder / INDEX_FILE).read_text()).get("metadata", {}) \
                .get(CONFIG_RECORD)
    except (OSError, ValueError, AttributeError, SafetensorError):
        pass
    return None

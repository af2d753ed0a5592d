"""lm-evaluation-harness on an exported model folder: the model ``rat``.

    python -m rat_plugin.eval --model rat --model_args pretrained=rat_model,add_bos=False \\
        --tasks hellaswag,arc_easy --batch_size 16 --device cuda

or in Python: ``import rat_plugin.eval.harness`` registers it for ``lm_eval.simple_evaluate(
model="rat", model_args="pretrained=rat_model", ...)``. Importing it also registers RAT with
transformers' Auto classes (``rat_plugin.hf``), so lm_eval's own model ``hf`` evaluates a folder
exported with ``--to-hf`` (``--model hf --model_args pretrained=rat_hf``).

model_args: ``pretrained`` (a folder from tools/convert_checkpoint.py), ``dtype`` (fp32 | bf16 |
fp16, default: stored), ``add_bos`` (default: the folder's), ``max_length`` (default: the
training length), ``cuda_graph`` (decode steps of generate_until as CUDA graph replays);
``device`` defaults to cuda where there is one, else cpu.

- add_bos: every text is encoded with the tokenizer's BOS first, as torchtitan's dataloader
  starts every training document; the default for a folder whose model was trained so (its
  ``add_bos``). ``add_bos=False`` encodes without it, as the RAT paper's harness wrapper does
  (an empty context is then EOS, lm_eval's default prefix): the default for paper imports.
- loglikelihood: one forward per batch of ``batch_size`` requests, right-padded, longest first;
  context and continuation are cut to the last ``max_length + 1`` tokens, as lm_eval's HF model
  does.
- loglikelihood_rolling: the document in lm_eval's rolling windows of ``max_length`` tokens.
- generate_until: ``rat_plugin.generate.generate`` (one prefill, then one cached decode step per
  token), stopping at EOS and at any stop string that is a single token; the text is cut at
  the first stop string. A prompt longer than ``max_length - max_gen_toks`` tokens is cut in
  the middle to that budget (``middle_truncate``: its first and last halves kept, as the RAT
  paper and LongBench cut long prompts), so prompt and answer fit ``max_length``.

The model ``hf_middle`` is lm_eval's ``hf`` with that same middle cut in generate_until (``hf``
keeps the last tokens of a long prompt); its ``max_length`` defaults to the training length
(``max_seq_len`` of the export's config), as ``rat``'s does.
"""

import json
from collections.abc import Callable, Sequence

import torch

try:
    import lm_eval.models  # noqa: F401  (lm_eval's own models stay registered beside ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise ImportError(
        "lm-evaluation-harness is not installed: pip install -e '.[eval]'"
    ) from None

import rat_plugin.hf  # noqa: F401, E402  (lm_eval's "hf" model loads --to-hf folders)
from rat_plugin.data.templates import middle_truncate
from rat_plugin.eval.scoring import continuation_logprobs
from rat_plugin.generate import generate, load, load_tokenizer
from rat_plugin.generate.arguments import check_count, resolve_device
from rat_plugin.generate.loading import special_token_ids

GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _batch_size(value) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"batch_size={value!r}: give a whole number >= 1 (no 'auto' for rat)")
    return value


def _max_length(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_length={value!r}: give a whole number of tokens >= 1")
    return value


def prompt_budget(max_length: int, max_gen_toks: int) -> int:
    """The tokens a generate_until prompt may have: ``max_length`` less the answer's room."""
    if max_length - max_gen_toks < 1:
        raise ValueError(
            f"max_gen_toks={max_gen_toks} leaves no room for a prompt within max_length="
            f"{max_length}: raise max_length (model_args) or lower max_gen_toks (gen_kwargs)")
    return max_length - max_gen_toks


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start: start + size]


@register_model("rat")
class RATHarnessModel(TemplateLM):
    """lm_eval's LM interface over ``rat_plugin.generate.load`` and ``generate``."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # for batch_size "auto", which rat does not take
        add_bos: bool | None = None,
        max_length: int | None = None,
        cuda_graph: bool = False,
    ):
        super().__init__()
        if not isinstance(add_bos, (bool, type(None))):
            raise ValueError(f"add_bos={add_bos!r}: give True or False")
        self.batch_size = _batch_size(batch_size)
        if max_length is not None:
            max_length = check_count(max_length, "max_length")
        self._device = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load(pretrained, device=self._device, dtype=dtype)
        self.tokenizer = load_tokenizer(pretrained)
        self.bos_id, self.eos_id = special_token_ids(pretrained, self.tokenizer)
        if self.eos_id is None:
            raise ValueError(f"{pretrained}/tokenizer_config.json names no eos_token: add it")
        if add_bos is None:
            add_bos = self.model.config.get("add_bos", True)
        self.add_bos = add_bos and self.bos_id is not None
        self._max_length = _max_length(max_length, self.model.args.max_seq_len)
        self.cuda_graph = cuda_graph

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.add_bos else self.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        ids = self.tokenizer.encode(string, add_special_tokens=False).ids
        add = self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos
        return [self.bos_id, *ids] if add else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _score(self, sequences: list[list[int]], lengths: list[int]) -> list[tuple[float, bool]]:
        """continuation_logprobs in batches of ``batch_size``, longest first."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list = [None] * len(sequences)
        for batch in _batches(order, self.batch_size):
            scores = continuation_logprobs(
                self.model, [sequences[i] for i in batch], [lengths[i] for i in batch]
            )
            for i, score in zip(batch, scores):
                results[i] = score
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        sequences = [(context + continuation)[-(self.max_length + 1):]
                     for _, context, continuation in requests]
        lengths = [min(len(continuation), len(sequence) - 1)
                   for (_, _, continuation), sequence in zip(requests, sequences)]
        results = self._score(sequences, lengths)
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        documents, sequences, lengths = [], [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                documents.append(index)
                sequences.append(context + continuation)
                lengths.append(len(continuation))
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(documents, self._score(sequences, lengths)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True), []).append(index)
        results: list = [None] * len(requests)
        for indices in groups.values():
            options = requests[indices[0]].args[1]
            unknown = sorted(set(options) - GEN_KWARGS)
            if unknown:
                raise ValueError(f"gen_kwargs {unknown} are not supported by rat: use "
                                 f"{sorted(GEN_KWARGS)}")
            until = options.get("until") or []
            # EOS always stops (a stop token); an empty string stops nothing.
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            sample = options.get("do_sample", False) and options.get("temperature", 1.0) > 0
            decode = self._generator(until, options, sample)
            budget = prompt_budget(self.max_length, options.get("max_gen_toks", 256))
            for batch in _batches(indices, self.batch_size):
                texts = decode([middle_truncate(self.tok_encode(requests[i].args[0]), budget)
                                for i in batch])
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generator(self, until: list[str], options: dict,
                   sample: bool) -> Callable[[list[list[int]]], list[str]]:
        single_tokens = [ids[0] for ids in (self.tok_encode(s, add_special_tokens=False)
                                            for s in until) if len(ids) == 1]
        stop = {self.eos_id, *single_tokens}

        def decode(prompts: list[list[int]]) -> list[str]:
            result = generate(
                self.model, prompts, options.get("max_gen_toks", 256),
                temperature=options.get("temperature", 1.0) if sample else 0.0,
                top_k=options.get("top_k") if sample else None,
                top_p=options.get("top_p") if sample else None,
                stop_tokens=stop, cuda_graph=self.cuda_graph,
            )
            texts = [self.tok_decode([t for t in tokens if t != self.eos_id])
                     for tokens in result.tokens]
            return [min((text.split(s)[0] for s in until), key=len, default=text)
                    for text in texts]

        return decode


@register_model("hf_middle")
class MiddleCutHFLM(HFLM):
    """lm_eval's ``hf`` model, except that generate_until cuts a prompt longer than its budget
    in the middle (``middle_truncate``) where ``hf`` keeps its last tokens."""

    def __init__(self, pretrained, max_length: int | None = None, **kwargs):
        super().__init__(pretrained=pretrained, max_length=max_length, **kwargs)
        self._max_length = _max_length(max_length, self.model.config.max_seq_len)

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                         left_truncate_len: int | None = None, truncation: bool = False):
        if not left_truncate_len:
            return super().tok_batch_encode(strings, padding_side, None, truncation)
        encode = super().tok_batch_encode  # one string: no padding, nothing cut
        rows = [middle_truncate(encode([s], padding_side, None, truncation)[0][0].tolist(),
                                left_truncate_len) for s in strings]
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(longest - len(row), longest) if padding_side == "left" \
                else slice(0, len(row))
            ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
        return ids, mask

"""Instruction data for supervised fine-tuning, the RAT paper's convention (docs/sft.md).

A record (``{"context": ..., "input": ..., "answers": [...]}`` or any fields a template names)
becomes one example per reference answer:

    [BOS] middle_truncate(prompt) answer EOS      prompt = render(template, record)

The answer follows the prompt after one space and is never cut; the prompt is cut in the middle
(``templates.middle_truncate``) when the example would exceed seq_len. Only the answer tokens
and the closing EOS are labels. Examples are packed whole into windows of seq_len tokens, each on
a chunk boundary with EOS filler after it, and a window that cannot take the next example is
filled up: every example computes exactly as if it were alone (docs/design.md section 7), with
the padding of the paper's one-example-per-window layout mostly gone.

Data (``[training] dataset_path`` / ``[validation] dataset_path``): a .jsonl, .json or .parquet
file; a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict's split, or a Dataset
as it is); or a folder holding the split as ``{split}.jsonl`` / ``.json`` / ``.parquet`` or
parquet shards (``{split}-*.parquet``, ``data/{split}-*.parquet`` as ``hf download`` lays them
out, ``{split}/*.parquet``). Records are read in their stored order.
"""

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.tools.logging import logger

from rat_plugin.data.packing import DocumentPackedDataset
from rat_plugin.data.templates import TemplateError, middle_truncate, render, resolve
from rat_plugin.infra import ConfigError

LONGQA_DATA = "./assets/data/rat_longqa"
SPLIT_FILES = ("{split}.jsonl", "{split}.json", "{split}.parquet", "{split}-*.parquet",
               "data/{split}-*.parquet", "{split}/*.parquet", "data/{split}/*.parquet")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MEASURED = 500  # records read at start to log the packing's padding and label share


def load_split(path: str | Path, split: str) -> Dataset:
    """The records of ``split`` under ``path`` (see the module docstring), map-style."""
    path = Path(path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file()
                          or (path / "state.json").is_file()):
        data = load_from_disk(str(path))
        if not isinstance(data, DatasetDict):
            return data
        if split not in data:
            raise ConfigError(f"{path} (saved by save_to_disk) has no split {split!r} (it has: "
                              f"{', '.join(data)}): point dataset_path at the split's data")
        return data[split]
    files = [path] if path.is_file() else []
    for pattern in SPLIT_FILES if path.is_dir() else ():
        files = sorted(path.glob(pattern.format(split=split)))
        if files:
            break
    if not files:
        looked = "a .jsonl/.json/.parquet file or a folder with " + ", ".join(
            p.format(split=split) for p in SPLIT_FILES)
        raise ConfigError(f"no {split} data at {path}: give {looked}, or a folder saved by "
                          "datasets' save_to_disk")
    kinds = {FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ConfigError(f"{files[0]}: give .jsonl, .json or .parquet files (one kind)")
    try:
        return load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as err:  # datasets' readers raise many kinds; the first line says why
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read {files[0]} ({reason})") from None


def _loader(split: str):
    return lambda path: load_split(path, split)


def _record(sample: dict) -> dict:
    return sample


# name -> (config, split, the template when [sft] template is empty)
SFT_DATASETS = {
    "sft": (DatasetConfig("", _loader("train"), _record), "train", None),
    "sft_validation": (DatasetConfig("", _loader("validation"), _record), "validation", None),
    "rat_longqa": (DatasetConfig(LONGQA_DATA, _loader("train"), _record), "train",
                   "rat_longqa"),
    "rat_longqa_validation": (DatasetConfig(LONGQA_DATA, _loader("validation"), _record),
                              "validation", "rat_longqa"),
}


def is_instruction_dataset(name: str) -> bool:
    return name.lower() in SFT_DATASETS


def answers_of(record: dict, field: str) -> list[str]:
    """The reference answers in ``record[field]`` (a string or a list of strings), stripped;
    ValueError (one line) for a missing field, a wrong type or an empty answer."""
    if field not in record:
        raise ValueError(f"the record has no answer field {field!r} (it has: {', '.join(record)}): set "
                         "[sft] answer_field to the field holding the answer")
    value = record[field]
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"the answer field {field!r} holds {type(value).__name__}, not a string or a list "
                         "of strings: set [sft] answer_field to the answer text's field")
    answers = [a.strip() for a in answers]
    if not answers or not all(answers):
        raise ValueError(f"the record has an empty answer in field {field!r} ({value!r}): fine-tuning needs "
                         "an answer to train on: fix or drop the record")
    return answers


def encode_example(
    tokenizer, prompt: str, answer: str, bos_id: int | None, eos_id: int, seq_len: int
) -> tuple[list[int], list[bool], bool]:
    """(tokens, label flags, whether the prompt was cut) of one example: BOS (if ``bos_id``),
    the prompt cut in the middle to fit, " " + answer, EOS; the answer and EOS are labels.

    The answer's tokens are those the prompt and answer get encoded together (the tokenizer may
    merge across the space as it does at generation), or the answer's own where the prompt's
    tokens are not a prefix of the joint encoding."""
    encode = tokenizer.tokenizer.encode  # the HF tokenizer: special tokens are added here
    prompt_ids = encode(prompt, add_special_tokens=False).ids
    joint = encode(f"{prompt} {answer}", add_special_tokens=False).ids
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        answer_ids = joint[len(prompt_ids):]
    else:
        answer_ids = encode(f" {answer}", add_special_tokens=False).ids
    head = [] if bos_id is None else [bos_id]
    budget = seq_len - len(head) - len(answer_ids) - 1
    if budget < 1:
        raise ValueError(
            f"the answer has {len(answer_ids)} tokens: with {'BOS, ' if head else ''}EOS and "
            f"at least one prompt token that needs {len(answer_ids) + len(head) + 2} > "
            f"seq_len={seq_len} tokens (the answer is never cut): use a longer seq_len or drop "
            "the record"
        )
    cut = middle_truncate(prompt_ids, budget)
    tokens = head + cut + answer_ids + [eos_id]
    labels = [False] * (len(head) + len(cut)) + [True] * (len(answer_ids) + 1)
    return tokens, labels, len(cut) < len(prompt_ids)


class InstructionPackedDataset(DocumentPackedDataset):
    """Instruction records as answer-only examples packed whole, document-aware; yields
    ``({"input": tokens, "document_starts": starts}, labels)``, each (seq_len,)."""

    def __init__(self, *args, template: str, answer_field: str, bos: bool, section: str,
                 **kwargs):
        self.template, self.answer_field, self.section = template, answer_field, section
        self._bos, self._shared = bos, kwargs.get("dp_world_size", 1) > 1
        super().__init__(*args, **kwargs)

    def _log_packing(self) -> None:
        try:
            resolve(self.template)
        except TemplateError as err:
            raise ConfigError(f"[sft] template: {err}") from None
        stats = self.packing_stats()
        logger.info(
            f"Instruction packing ({self.dataset_name}, template {self.template!r}, "
            f"seq_len={self.seq_len}, chunk_size={self.chunk_size}): over the first "
            f"{stats['examples']} examples, {stats['examples'] / max(stats['windows'], 1):.2f} "
            f"per window, {100 * stats['padding']:.1f}% of the window tokens are padding (one "
            f"example per window: {100 * stats['padding_one_per_window']:.1f}%), "
            f"{100 * stats['labels']:.1f}% are labels; {stats['cut']} prompts cut in the middle"
        )

    def packing_stats(self) -> dict:
        """The packing of the first ``MEASURED`` records: examples, windows, prompts cut, and the
        share of window tokens that are padding, labels, and padding with one example per
        window."""
        windows, used, lengths, labels, cut = 0, self.seq_len, [], 0, 0
        for index, record in enumerate(self._data.take(MEASURED)):  # take(): keeps the position
            for tokens, flags, was_cut in self._examples(record, index):
                size = len(tokens) + -len(tokens) % self.chunk_size
                if used + len(tokens) > self.seq_len:
                    windows, used = windows + 1, 0
                used += size
                lengths.append(len(tokens))
                labels += sum(flags)
                cut += was_cut
        total = max(windows * self.seq_len, 1)
        return {"examples": len(lengths), "windows": windows, "cut": cut,
                "labels": labels / total,
                "padding": 1 - sum(lengths) / total,
                "padding_one_per_window": 1 - sum(lengths) / max(len(lengths) * self.seq_len, 1)}

    def _examples(self, record: dict, index: int):
        """(tokens, labels, cut) of every reference answer of ``record``."""
        where = f"[{self.section}] dataset {self.dataset_name!r} record {index}"
        if "_id" in record:
            where += f" ({record['_id']})"
        if self._shared:
            where += " of this data-parallel rank's share"
        try:
            prompt = render(self.template, record)
            answers = answers_of(record, self.answer_field)
            bos = self._tokenizer.bos_id if self._bos else None
            return [encode_example(self._tokenizer, prompt, answer, bos, self._tokenizer.eos_id,
                                   self.seq_len) for answer in answers]
        except ValueError as err:  # TemplateError included
            raise ConfigError(f"{where}: {err}") from None

    def _pack(self, sample) -> None:
        for tokens, labels, _ in self._examples(sample, self._sample_idx):
            if len(self._token_buffer) + len(tokens) > self.seq_len:
                self._fill(self.seq_len)  # the example goes whole into the next window
            self._append(tokens, labels)

    def _fill(self, length: int) -> None:
        """EOS filler up to ``length`` buffered tokens, continuing the last document."""
        count = length - len(self._token_buffer)
        last = self._offset_buffer[-1] if self._offset_buffer else -1
        self._token_buffer += [self._tokenizer.eos_id] * count
        self._offset_buffer += list(range(last + 1, last + 1 + count))
        self._label_buffer += [False] * count

    def _last_windows(self):
        """The last, partly filled window: every held-out example counts."""
        if any(self._label_buffer[1:]):
            self._fill(self.seq_len + 1)
            yield self._window()

"""Instruction data for fine-tuning (rat_plugin/data/sft.py, docs/sft.md): the windows against an
independent build of the paper's convention (template, answer-only labels, EOS, middle cut),
packing that keeps each example exactly as it computes alone, and one-line errors."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

import rat_plugin.train_spec as ts  # noqa: F401  (registers the datasets)
from rat_plugin.data.sft import InstructionPackedDataset, load_split
from rat_plugin.infra import ConfigError

L = 16
SEQ_LEN = 128
IGNORE = -100
WORDS = "the cat sat on a mat and then it ran far away to the old red barn".split()


def text(n: int, shift: int = 0) -> str:
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(n))


# Prompts of all sizes: short ones that share windows, one longer than SEQ_LEN (cut in the
# middle), an answer longer than half of SEQ_LEN, and a record with two reference answers.
RECORDS = [
    {"context": text(5), "input": "who?", "answers": ["Anna"]},
    {"context": text(30, 3), "input": "where did it go?", "answers": ["the barn"]},
    {"context": text(200, 1), "input": "what sat?", "answers": ["the cat"]},  # > SEQ_LEN
    {"context": text(8, 2), "input": "tell it all", "answers": [text(75, 4)]},  # > SEQ_LEN / 2
    {"context": text(12), "input": "which mat?", "answers": ["a mat", "the red one"]},
    {"context": text(150, 5), "input": "long again?", "answers": [text(40)]},  # cut, long answer
    {"context": text(3), "input": "and?", "answers": ["far"]},
]
TEMPLATE = "Story: {context}\n\nQuestion: {input}\n\nAnswer:"


@pytest.fixture
def tokenizer(debug_assets):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(str(debug_assets / "tokenizer"))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def dataset(tokenizer, path, seq_len=SEQ_LEN, template=TEMPLATE, answer_field="answers",
            bos=True, infinite=False, **kwargs) -> InstructionPackedDataset:
    return InstructionPackedDataset(
        "sft", str(path), tokenizer, seq_len=seq_len, chunk_size=L, infinite=infinite,
        template=template, answer_field=answer_field, bos=bos, section="training", **kwargs)


# ------------------------------------------------------------------ the oracle


def expected_examples(tokenizer, records, seq_len, bos=True):
    """(tokens, labels aligned with tokens: the token itself where it is a target, else
    IGNORE, whether the prompt was cut) of each example, written out from the paper's
    convention."""
    raw = tokenizer.tokenizer
    examples = []
    for record in records:
        prompt = (f"Story: {record['context']}\n\nQuestion: {record['input']}\n\nAnswer:")
        for answer in record["answers"]:
            head = [tokenizer.bos_id] if bos else []
            prompt_ids = raw.encode(prompt, add_special_tokens=False).ids
            answer_ids = raw.encode(" " + answer, add_special_tokens=False).ids
            room = seq_len - len(head) - len(answer_ids) - 1
            cut = len(prompt_ids) > room
            if cut:  # keep the first floor(room/2) and the last rest
                keep_first = room // 2
                keep_last = room - keep_first
                prompt_ids = prompt_ids[:keep_first] + prompt_ids[-keep_last:]
            tokens = head + prompt_ids + answer_ids + [tokenizer.eos_id]
            targets = [IGNORE] * (len(head) + len(prompt_ids)) + answer_ids + [tokenizer.eos_id]
            examples.append((tokens, targets, cut))
    return examples


def layout(examples, seq_len):
    """[(start, example index)] per window: whole examples from chunk boundaries, the next
    window opened when an example does not fit."""
    windows, position = [[]], 0
    for index, (tokens, _, _) in enumerate(examples):
        if position + len(tokens) > seq_len:
            windows.append([])
            position = 0
        windows[-1].append((position, index))
        position += len(tokens) + (-len(tokens)) % L
    return windows


def expected_windows(examples, seq_len, eos):
    """(input, labels, document_starts) of each window of ``layout``; EOS fills the rest."""
    out = []
    for spans in layout(examples, seq_len):
        inputs = torch.full((seq_len,), eos)
        labels = torch.full((seq_len,), IGNORE)
        starts = torch.zeros(seq_len, dtype=torch.long)
        for start, index in spans:
            tokens, targets, _ = examples[index]
            inputs[start:start + len(tokens)] = torch.tensor(tokens)
            # position p predicts the token at p + 1
            labels[start:start + len(tokens) - 1] = torch.tensor(targets[1:])
            starts[start:] = start
        out.append((inputs, labels, starts))
    return out


def test_windows_hold_the_papers_examples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    examples = expected_examples(tokenizer, RECORDS, SEQ_LEN)
    assert len(examples) == 8
    lengths = [len(t) for t, _, _ in examples]
    assert lengths[2] == lengths[6] == SEQ_LEN  # both cut to the window
    answer = [sum(x != IGNORE for x in targets) for _, targets, _ in examples]
    assert answer[3] > SEQ_LEN // 2 and answer[6] > 40  # long answers kept whole
    want = expected_windows(examples, SEQ_LEN, tokenizer.eos_id)
    got = list(iter(dataset(tokenizer, tmp_path)))
    assert len(got) == len(want) >= 5
    for i, ((inputs, labels), (want_inputs, want_labels, want_starts)) in enumerate(
            zip(got, want)):
        assert torch.equal(inputs["input"], want_inputs), i
        assert torch.equal(labels, want_labels), i
        assert torch.equal(inputs["document_starts"], want_starts), i
    # The labels spell the answers and EOS, nothing else.
    targets = [t for _, labels in got for t in labels.tolist() if t != IGNORE]
    assert targets[-1] == tokenizer.eos_id
    spelled, answer = [], []
    for t in targets:
        if t == tokenizer.eos_id:
            spelled.append(tokenizer.decode(answer))
            answer = []
        else:
            answer.append(t)
    assert spelled == [" " + a for r in RECORDS for a in r["answers"]]


def test_without_bos_examples_start_with_the_prompt(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", RECORDS[:2])
    (inputs, labels), = list(iter(dataset(tokenizer, tmp_path, bos=False)))
    (want_inputs, want_labels, _), = expected_windows(
        expected_examples(tokenizer, RECORDS[:2], SEQ_LEN, bos=False), SEQ_LEN, tokenizer.eos_id)
    assert inputs["input"][0] != tokenizer.bos_id
    assert torch.equal(inputs["input"], want_inputs) and torch.equal(labels, want_labels)


@pytest.mark.parametrize("layout", ["jsonl-file", "parquet-shards", "save_to_disk"])
def test_local_layouts_read_the_same_records(tmp_path, layout):
    from datasets import Dataset, DatasetDict

    data = Dataset.from_list(RECORDS)
    if layout == "jsonl-file":
        path = write_jsonl(tmp_path / "narrativeqa.jsonl", RECORDS)
    elif layout == "parquet-shards":  # as `hf download` lays out a dataset repository
        (tmp_path / "data").mkdir()
        data.select(range(3)).to_parquet(tmp_path / "data" / "train-00000-of-00002.parquet")
        data.select(range(3, 7)).to_parquet(tmp_path / "data" / "train-00001-of-00002.parquet")
        data.select(range(1)).to_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet")
        path = tmp_path
    else:
        DatasetDict(train=data, validation=data.select(range(1))).save_to_disk(tmp_path / "d")
        path = tmp_path / "d"
    assert [dict(r) for r in load_split(path, "train")] == RECORDS
    if layout != "jsonl-file":
        assert len(load_split(path, "validation")) == 1


def test_resumes_exactly_from_its_state(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    reference = list(iter(dataset(tokenizer, tmp_path)))
    first = dataset(tokenizer, tmp_path)
    it = iter(first)
    next(it), next(it)
    resumed = dataset(tokenizer, tmp_path)
    resumed.load_state_dict(first.state_dict())
    rest = list(iter(resumed))
    assert len(rest) == len(reference) - 2
    for (inputs, labels), (want_inputs, want_labels) in zip(rest, reference[2:]):
        assert torch.equal(inputs["input"], want_inputs["input"])
        assert torch.equal(inputs["document_starts"], want_inputs["document_starts"])
        assert torch.equal(labels, want_labels)


def test_packing_stats_count_what_the_windows_hold(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    windows = list(iter(dataset(tokenizer, tmp_path)))
    examples = expected_examples(tokenizer, RECORDS, SEQ_LEN)
    stats = dataset(tokenizer, tmp_path).packing_stats()
    total = len(windows) * SEQ_LEN
    assert stats["examples"] == len(examples) and stats["windows"] == len(windows)
    assert stats["cut"] == sum(cut for _, _, cut in examples) >= 2
    used = sum(len(t) for t, _, _ in examples)
    assert stats["padding"] == pytest.approx(1 - used / total)
    assert stats["padding_one_per_window"] == pytest.approx(1 - used / (8 * SEQ_LEN))
    labels = sum(int((lab != IGNORE).sum()) for _, lab in windows)
    assert stats["labels"] == pytest.approx(labels / total)


# ------------------------------------------------------------------ as if alone

KERNELS = {"portable": ("torch", "torch"), "gpu": ("triton", "flex")}


def build(kind: str, kernels: tuple[str, str]):
    from rat_plugin.model import RATModel, make_args

    window = {"swa_window": 32} if kind.endswith("swa") else {}
    args = make_args(kind, "debugmodel", n_layers=2, scan_kernel=kernels[0],
                     attention_kernel=kernels[1], **window)
    torch.manual_seed(0)
    model = RATModel(args)
    model.init_weights()
    return model


@pytest.mark.usefixtures("one_thread", "cpu_flex_backward")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("kind", ["rat", "rat_swa"])  # the fine-tuned kinds (all: test_documents)
def test_packed_examples_compute_as_if_alone(kind, kernels, tmp_path, tokenizer):
    """Logits and gradients of the packed windows equal each example's alone; the loss (the
    trainer's: summed over labels / their count) equals one example per padded window's."""
    from torchtitan.components.loss import cross_entropy_loss

    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    windows = list(iter(dataset(tokenizer, tmp_path)))
    inputs = torch.stack([w["input"] for w, _ in windows])
    starts = torch.stack([w["document_starts"] for w, _ in windows])
    labels = torch.stack([label for _, label in windows])
    examples = expected_examples(tokenizer, RECORDS, SEQ_LEN)
    spans = layout(examples, SEQ_LEN)
    assert max(len(s) for s in spans) >= 2  # windows really hold several examples

    model = build(kind, KERNELS[kernels])
    params = list(model.parameters())
    logits = model(inputs, document_starts=starts)
    packed_sum = cross_entropy_loss(logits, labels)
    packed_grads = torch.autograd.grad(packed_sum, params)

    alone_sum = 0
    for w, window in enumerate(spans):
        for start, index in window:
            tokens, targets, _ = examples[index]
            alone = model(torch.tensor([tokens]))[0]
            torch.testing.assert_close(logits[w, start:start + len(tokens)], alone, rtol=1e-5,
                                       atol=1e-5, msg=f"example {index} in window {w}")
            alone_sum = alone_sum + F.cross_entropy(
                alone[:-1], torch.tensor(targets[1:]), ignore_index=IGNORE, reduction="sum")
    alone_grads = torch.autograd.grad(alone_sum, params)
    for (name, _), got, want in zip(model.named_parameters(), packed_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)

    # The paper's layout: one example per window from position 0, EOS padding, no masks.
    padded = torch.full((len(examples), SEQ_LEN), tokenizer.eos_id)
    padded_labels = torch.full((len(examples), SEQ_LEN), IGNORE)
    for i, (tokens, targets, _) in enumerate(examples):
        padded[i, :len(tokens)] = torch.tensor(tokens)
        padded_labels[i, :len(tokens) - 1] = torch.tensor(targets[1:])
    count = int((labels != IGNORE).sum())
    assert count == int((padded_labels != IGNORE).sum())
    with torch.no_grad():
        padded_loss = cross_entropy_loss(model(padded), padded_labels) / count
    torch.testing.assert_close(packed_sum.detach() / count, padded_loss, rtol=1e-5, atol=1e-6)
    assert len(windows) < len(examples)  # the point of packing


# ------------------------------------------------------------------ bad input

GOOD = {"context": "a story", "input": "who?", "answers": ["Anna"]}
BAD_RECORDS = {
    "record-without-the-templates-field": (
        [GOOD, {"context": "a story", "answers": ["Ben"]}], {},
        r"^\[training\] dataset 'sft' record 1: the record's field 'input', which template "
        r"'Story: \{context\}\\n\\nQuestion: \{input\}\\n\\nAnswer:' names, is null \(or "
        r"missing in this record of a table\): give it a value or drop the record$"),
    "template-naming-a-missing-field": (
        [GOOD], {"template": "Document: {document}\n\nAnswer:"},
        r"^\[training\] dataset 'sft' record 0: the record has no field 'document', which "
        r"template 'Document: \{document\}\\n\\nAnswer:' names \(the record has: context, input, "
        r"answers\)"),
    "empty-answer": (
        [GOOD, {**GOOD, "answers": ["  "], "_id": "q-7"}], {},
        r"^\[training\] dataset 'sft' record 1 \(q-7\): the record has an empty answer in field "
        r"'answers' \(\['  '\]\): fine-tuning needs an answer to train on: fix or drop the "
        r"record$"),
    "no-answers-at-all": (
        [{**GOOD, "answers": []}], {}, r"record 0: the record has an empty answer in field"),
    "answer-field-missing": (
        [GOOD], {"answer_field": "answer"},
        r"record 0: the record has no answer field 'answer' \(it has: context, input, answers\): "
        r"set \[sft\] answer_field to the field holding the answer$"),
    "answer-field-not-text": (
        [{**GOOD, "answers": 3}], {},
        r"record 0: the answer field 'answers' holds int, not a string or a list of strings"),
    "seq-len-cannot-hold-the-answer": (
        [GOOD, {**GOOD, "answers": [text(40)]}], {"seq_len": 32},
        r"^\[training\] dataset 'sft' record 1: the answer has \d\d tokens: with BOS, EOS and at "
        r"least one prompt token that needs \d\d > seq_len=32 tokens \(the answer is never "
        r"cut\): use a longer seq_len or drop the record$"),
    "unknown-template-name": (
        [GOOD], {"template": "storyqa"},
        r"^\[sft\] template: template 'storyqa' is neither a built-in name \(narrativeqa, "),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_input_is_one_line(case, tmp_path, tokenizer):
    records, options, message = BAD_RECORDS[case]
    write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(ConfigError) as err:
        list(iter(dataset(tokenizer, tmp_path, **options)))
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_a_record_past_the_measured_ones_fails_when_it_is_reached(tmp_path, tokenizer,
                                                                  monkeypatch):
    """The start reads only the first records; a bad one later stops training at that record,
    with the same line."""
    import rat_plugin.data.sft as sft

    monkeypatch.setattr(sft, "MEASURED", 2)
    write_jsonl(tmp_path / "train.jsonl", [GOOD] * 3 + [{**GOOD, "answers": [""]}])
    data = dataset(tokenizer, tmp_path)
    with pytest.raises(ConfigError, match=r"^\[training\] dataset 'sft' record 3: the record "
                       "has an empty answer"):
        list(iter(data))


def job(*overrides: str):
    from torchtitan.config import ConfigManager

    from conftest import REPO

    return ConfigManager().parse_args(
        ["--job.config_file", str(REPO / "train_configs" / "rat_debug_sft.toml"), *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["--training.dataset", "sft", "--training.dataset_path", "{tmp}/data", "--sft.template="],
     r"^\[sft\] template is not set for \[training\] dataset='sft': name one of narrativeqa, "
     r"qmsum, wikisum, rat_longqa or give a template string over the records' fields$"),
    (["--training.dataset", "sft"],
     r"^dataset 'sft' not found at \(not set\): set \[training\] dataset_path "
     r"\(--training.dataset_path\) or point it at instruction records \(docs/sft.md\)$"),
    (["--training.dataset", "sft", "--training.dataset_path", "{tmp}", "--sft.template",
      "qmsum"],
     r"^no train data at .*: give a .jsonl/.json/.parquet file or a folder with train.jsonl, "
     r"train.json, train.parquet, train-\*.parquet"),
    (["--training.dataset_path", "{tmp}/nowhere"],
     r"^dataset 'rat_longqa' not found at .*nowhere/train.jsonl: set \[training\] dataset_path "
     r"\(--training.dataset_path\) or run `python -m rat_plugin.data.prepare`"),
])
def test_bad_sft_settings_are_one_line(overrides, message, tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [GOOD])
    config = job(*(o.format(tmp=tmp_path) for o in overrides))
    with pytest.raises(ConfigError) as err:
        ts.build_dataloader(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, job_config=config)
    assert re.search(message, str(err.value)), str(err.value)


def test_a_rank_without_records_is_one_line(tmp_path, tokenizer):
    """Instruction data goes through the same check of every rank's share as text data."""
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    config = job("--training.dataset", "sft", "--training.dataset_path", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^\[training\] dataset 'sft' at .* gives "
                       r"data-parallel rank\(s\) \[1\] of 2 no documents"):
        ts.build_dataloader(dp_world_size=2, dp_rank=1, tokenizer=tokenizer, job_config=config)


def test_a_missing_pretrained_checkpoint_is_one_line(tmp_path):
    from rat_plugin.infra.resume import check_resume

    config = job(f"--checkpoint.initial_load_path={tmp_path}/nowhere",
                 f"--job.dump_folder={tmp_path}/run")
    with pytest.raises(ConfigError, match=r"^\[checkpoint\] initial_load_path=.*nowhere does not "
                       r"exist: point it at the weights to start from \(a step folder of a run, "
                       r"or a seed from tools/convert_checkpoint.py --to-dcp\)"):
        check_resume(config)


# ------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("config", ["rat_1p3b_sft.toml", "rat_swa_1p3b_sft.toml"])
def test_1p3b_sft_configs_read_the_papers_data(config):
    """The optimizer, schedule and batch: test_train_spec.py, with the pretraining recipes."""
    from torchtitan.config import ConfigManager

    from conftest import REPO

    c = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs" / config)])
    assert (c.training.dataset, c.validation.dataset) == ("sft", "sft_validation")
    assert c.validation.enable and c.validation.steps > 0  # -1 is refused under FSDP
    assert (c.sft.template, c.sft.answer_field, c.sft.bos) == ("narrativeqa", "answers", True)
    assert c.checkpoint.initial_load_path and c.checkpoint.initial_load_model_only
    assert c.model.name == config.removesuffix("_1p3b_sft.toml")

"""tools/prepare_sft.py: the paper's fine-tuning sources (hand-made rows in each download's schema
and layout) become instruction records that the SFT dataset reads."""

import json
import sys

import pytest
from datasets import Dataset

from conftest import REPO, run_main

sys.path.insert(0, str(REPO / "tools"))
import prepare_sft  # noqa: E402


def narrativeqa_rows(n: int) -> list[dict]:
    """deepmind/narrativeqa's schema (nested document, question, answers)."""
    return [{"document": {"id": f"d{i}", "kind": "movie", "text": f"full text {i}",
                          "summary": {"text": f"summary {i}", "title": f"t{i}"}},
             "question": {"text": f"question {i}?"},
             "answers": [{"text": f"first {i}"}, {"text": f"second {i}"}]} for i in range(n)]


def write_download(folder, rows_by_split):
    """The layout `hf download` gives a parquet dataset repository: data/{split}-*.parquet."""
    (folder / "data").mkdir(parents=True)
    for split, rows in rows_by_split.items():
        Dataset.from_list(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_narrativeqa_summaries_with_both_answers(tmp_path, capsys):
    write_download(tmp_path / "hf", {"train": narrativeqa_rows(30), "validation":
                                     narrativeqa_rows(5), "test": narrativeqa_rows(250)})
    code, out, err = run_main(prepare_sft.main, ["narrativeqa_summary", str(tmp_path / "hf"),
                                                 str(tmp_path / "out")], capsys)
    assert code == 0, err
    train = read(tmp_path / "out" / "train.jsonl")
    assert sorted(r["input"] for r in train) == sorted(f"question {i}?" for i in range(30))
    assert [r["input"] for r in train] != [f"question {i}?" for i in range(30)]  # shuffled
    for r in train:
        i = r["input"].split()[1][:-1]
        assert r["context"] == f"summary {i}" and r["answers"] == [f"first {i}", f"second {i}"]
    test = read(tmp_path / "out" / "test.jsonl")
    assert len(test) == 200 == len({r["input"] for r in test})  # LongBench's 200-record sample
    assert [r["_id"] for r in test] == [f"narrativeqa_summary-test-{i}" for i in range(200)]
    assert "--sft.template=narrativeqa" in out

    # The SFT dataset reads the output: one example per reference answer.
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    import rat_plugin.train_spec  # noqa: F401  (registers the datasets)
    from rat_plugin.data.sft import InstructionPackedDataset

    tokenizer = HuggingFaceTokenizer(str(REPO / "assets" / "tokenizer"))
    data = InstructionPackedDataset("sft", str(tmp_path / "out"), tokenizer, seq_len=128,
                                    chunk_size=16, template="narrativeqa",
                                    answer_field="answers", bos=True, section="training")
    assert data.packing_stats()["examples"] == 60


def test_full_text_and_wikisum_and_qmsum_fields(tmp_path, capsys):
    write_download(tmp_path / "nqa", {s: narrativeqa_rows(3) for s in
                                      ("train", "validation", "test")})
    assert run_main(prepare_sft.main, ["narrativeqa_full", str(tmp_path / "nqa"),
                                       str(tmp_path / "full")], capsys)[0] == 0
    assert {r["context"] for r in read(tmp_path / "full" / "validation.jsonl")} == {
        f"summary {i}\n\nfull text {i}" for i in range(3)}

    wiki = [{"url": "u", "title": f"title {i}", "summary": f"sum {i}", "article": f"art {i}",
             "step_headers": ""} for i in range(4)]
    write_download(tmp_path / "wiki", {s: wiki for s in ("train", "validation", "test")})
    assert run_main(prepare_sft.main, ["wikisum", str(tmp_path / "wiki"),
                                       str(tmp_path / "w")], capsys)[0] == 0
    assert sorted((r["context"], r["input"], r["answers"][0])
                  for r in read(tmp_path / "w" / "train.jsonl")) == [
        (f"art {i}", f"title {i}", f"sum {i}") for i in range(4)]

    qmsum = [{"id": str(i), "prompt": f"query {i}", "input": f"transcript {i}",
              "output": f"reply {i}"} for i in range(3)]
    folder = tmp_path / "qmsum" / "no-prefix"
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):  # pszemraj/qmsum-cleaned's no-prefix layout
        Dataset.from_list(qmsum).to_parquet(folder / f"{split}-00000-of-00001.parquet")
    assert run_main(prepare_sft.main, ["qmsum", str(folder), str(tmp_path / "q")], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["train.jsonl",
                                                                  "validation.jsonl"]
    assert sorted((r["context"], r["input"], r["answers"][0])
                  for r in read(tmp_path / "q" / "train.jsonl")) == [
        (f"transcript {i}", f"query {i}", f"reply {i}") for i in range(3)]


@pytest.mark.parametrize("case", ["missing-split", "wrong-schema", "existing-output"])
def test_bad_sources_are_one_line(case, tmp_path, capsys):
    rows = narrativeqa_rows(2) if case != "wrong-schema" else [{"text": "x"}]
    splits = ("train",) if case == "missing-split" else ("train", "validation", "test")
    write_download(tmp_path / "hf", {s: rows for s in splits})
    if case == "existing-output":
        (tmp_path / "out").mkdir()
    code, _, err = run_main(prepare_sft.main, ["narrativeqa_summary", str(tmp_path / "hf"),
                                               str(tmp_path / "out")], capsys)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 1 and len(errors) == 1 and errors[0].startswith("error: ")
    err = errors[0]
    assert {"missing-split": "error: no validation data at",
            "wrong-schema": "error: a ", "existing-output": "already exists: pass --force"
            }[case] in err
    if case == "wrong-schema":
        assert "row has no field 'document'" in err

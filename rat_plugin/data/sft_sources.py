"""The RAT paper's fine-tuning datasets, from local downloads to LongBench's record fields.

The paper (CLAIRE-Labo/RAT, tokenize/sft_util.py) renames each source's columns to
``context`` / ``input`` / ``answer``; here the answers go in a list (``answers``), so that a
NarrativeQA question's two reference answers are two training examples, as the paper trains
them, and one scored record. Training and validation records are shuffled with the paper's seed
(1234); the test records are the paper's 200-record samples (LongBench's way). QMSum's test set
is LongBench's own ``qmsum`` (scored by generation, not written here).
"""

import random
from collections.abc import Callable

from datasets import Dataset

SEED = 1234
TEST_RECORDS = 200


def _narrativeqa(context: str) -> Callable[[dict], dict]:
    def convert(row: dict) -> dict:
        summary, text = row["document"]["summary"]["text"], row["document"]["text"]
        body = {"summary": summary, "text": text, "full": summary + "\n\n" + text}[context]
        return {"context": body, "input": row["question"]["text"],
                "answers": [answer["text"] for answer in row["answers"]]}

    return convert


def _qmsum(row: dict) -> dict:  # pszemraj/qmsum-cleaned, no-prefix
    return {"context": row["input"], "input": row["prompt"], "answers": [row["output"]]}


def _wikisum(row: dict) -> dict:  # d0rj/wikisum
    return {"context": row["article"], "input": row["title"], "answers": [row["summary"]]}


# task -> (record of a source row, splits written, whether the test split is shuffled before
# the sample)
TASKS = {
    "narrativeqa_summary": (_narrativeqa("summary"), ("train", "validation", "test"), True),
    "narrativeqa_text": (_narrativeqa("text"), ("train", "validation", "test"), True),
    "narrativeqa_full": (_narrativeqa("full"), ("train", "validation", "test"), True),
    "qmsum": (_qmsum, ("train", "validation"), False),
    "wikisum": (_wikisum, ("train", "validation", "test"), False),
}
TEMPLATE_OF = {"qmsum": "qmsum", "wikisum": "wikisum"}  # the others: narrativeqa


def convert_split(task: str, split: str, rows: Dataset) -> Dataset:
    """The records of ``split`` of ``task`` from its source rows, selected as the paper does."""
    convert, _, shuffle_test = TASKS[task]
    records = rows.map(convert, remove_columns=rows.column_names)
    if split != "test":
        records = records.shuffle(seed=SEED)
    else:
        if shuffle_test:
            records = records.shuffle(seed=SEED)
        random.seed(SEED)
        records = records.select(
            random.sample(range(len(records)), min(TEST_RECORDS, len(records))))
    return records.map(lambda _, i: {"_id": f"{task}-{split}-{i}"}, with_indices=True)

"""Datasets the RAT configs name, registered in torchtitan's ``DATASETS`` table.

- ``rat_debug`` / ``rat_debug_validation``: the generated corpus (``python -m
  rat_plugin.data.prepare``), read from local jsonl into an in-memory map-style dataset, so
  the dataloader's checkpointed position is exact and nothing touches the network.
- ``fineweb_edu``: a local copy of HuggingFaceFW/fineweb-edu (parquet files), streamed; the
  folder is ``[training] dataset_path``.
- ``fineweb_edu_validation``: the same from ``[validation] dataset_path``, a folder holding
  FineWeb-Edu parquet files held out of the training folder.
- ``sft`` / ``sft_validation``: instruction records for fine-tuning (``rat_plugin.data.sft``)
  from ``dataset_path``; ``rat_longqa`` / ``rat_longqa_validation``: the generated long-context
  QA set (``rat_plugin.data.longqa``, written by ``prepare``).
"""

import json
import os
from pathlib import Path

from datasets import Dataset, load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from rat_plugin.data.sft import SFT_DATASETS
from rat_plugin.infra import ConfigError

DEBUG_DATA = "./assets/data/rat_debug"
PREPARE_HINT = "run `python -m rat_plugin.data.prepare` from the repo root"


def _load_jsonl(split: str):
    def load(path: str) -> Dataset:
        with open(Path(path) / f"{split}.jsonl") as f:
            texts = [json.loads(line)["text"] for line in f]
        return Dataset.from_dict({"text": texts})

    return load


def _load_parquet_folder(path: str):
    return load_dataset(path, split="train", streaming=True)


def _text(sample: dict) -> str:
    return sample["text"]


# name -> (config, file that must exist under the path, how to get the data)
LOCAL_DATASETS = {
    "rat_debug": (DatasetConfig(DEBUG_DATA, _load_jsonl("train"), _text), "train.jsonl",
                  PREPARE_HINT),
    "rat_debug_validation": (DatasetConfig(DEBUG_DATA, _load_jsonl("validation"), _text),
                             "validation.jsonl", PREPARE_HINT),
    "fineweb_edu": (DatasetConfig("", _load_parquet_folder, _text), "",
                    "download HuggingFaceFW/fineweb-edu (see README, 'Training the 1.3B model')"),
    "fineweb_edu_validation": (DatasetConfig("", _load_parquet_folder, _text), "",
                               "move a FineWeb-Edu parquet file out of the training folder into "
                               "it (see README, 'Evaluating a model')"),
    **{name: (config, "" if config.path == "" else f"{split}.jsonl",
              PREPARE_HINT if config.path else "point it at instruction records (docs/sft.md)")
       for name, (config, split, _) in SFT_DATASETS.items()},
}


def register_datasets() -> None:
    for name, (config, _, _) in LOCAL_DATASETS.items():
        DATASETS[name] = config


def check_dataset_path(name: str, path: str | None, section: str) -> None:
    """Fail with one line naming ``[section] dataset_path`` when a local dataset is missing."""
    if name.lower() not in LOCAL_DATASETS:
        return  # torchtitan's own datasets: its loader reports problems
    config, required, hint = LOCAL_DATASETS[name.lower()]
    path = path or config.path
    if not path or not os.path.exists(os.path.join(path, required)):
        shown = os.path.join(path, required) if path else "(not set)"
        raise ConfigError(
            f"dataset {name!r} not found at {shown}: set [{section}] dataset_path "
            f"(--{section}.dataset_path) or {hint}"
        )

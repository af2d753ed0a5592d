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
    """Fail with one line naming ``[section] dataset`` when no dataset has that name, or
    ``[section] dataset_path`` when a local dataset is missing."""
    if name.lower() not in DATASETS:
        raise ConfigError(
            f"[{section}] dataset={name!r} is unknown: choose one of {sorted(DATASETS)} "
            f"(--{section}.dataset)"
        )
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


def has_documents(dataset) -> bool:
    """Whether this rank's share of a torchtitan text dataset (``HuggingFaceTextDataset`` or
    ``DocumentPackedDataset``) holds a document; read through ``take``, which leaves the
    checkpointed position of a streamed dataset where it is."""
    return next(iter(dataset._data.take(1)), None) is not None


def documents_problem(name: str, path: str | None, section: str, empty: list[int],
                      dp_world_size: int) -> ConfigError | None:
    """The one-line error for the data-parallel ranks ``empty`` whose share of the dataset
    holds no document (None when there is none): such a rank would loop forever looking for
    data while the others wait for it in a collective."""
    if not empty:
        return None
    shown = f"{name!r} at {path or DATASETS[name.lower()].path}"
    if len(empty) == dp_world_size:
        return ConfigError(
            f"[{section}] dataset {shown} holds no documents: point [{section}] dataset_path at "
            f"the data (--{section}.dataset_path)"
        )
    return ConfigError(
        f"[{section}] dataset {shown} gives data-parallel rank(s) {empty} of {dp_world_size} no "
        f"documents (each rank reads its own share): give it at least {dp_world_size} documents, "
        "or use fewer data-parallel ranks"
    )

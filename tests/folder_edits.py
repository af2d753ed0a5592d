"""Edits that spoil a copy of a converted model folder, for the bad-input tables."""

import json
from pathlib import Path

import safetensors.torch


def spoil_weight(name: str, index: tuple, value: float):
    """Set one element of a stored weight (to NaN, inf or an absurd value)."""
    def edit(folder: Path) -> None:
        path = str(folder / "model.safetensors")
        state = safetensors.torch.load_file(path)
        state[name][index] = value
        safetensors.torch.save_file(state, path)
    return edit


def edit_config(**fields):
    """Change fields of config.json's model arguments."""
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["args"].update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def write(name: str, text: str):
    """Overwrite one file of the folder."""
    def edit(folder: Path) -> None:
        (folder / name).write_text(text)
    return edit

"""Python API surface (rat_plugin.generate.load / generate), one table row per bad input: a
ValueError or TypeError raised at the boundary, one line naming the argument and the fix, or
the correct behaviour."""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

from rat_plugin.convert import ModelSpec, dcp_to_standalone
from rat_plugin.generate import ModelFolderError, load
from rat_plugin.generate.loading import ConfigMismatchWarning
from rat_plugin.model import RATModel, make_args

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dim=64, n_layers=2, ffn_hidden_dim=128, vocab_size=1024, max_seq_len=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A converted small rat model folder."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model = RATModel(make_args("rat", "debugmodel", **SMALL))
    model.init_weights()
    dcp.save(model.state_dict(), checkpoint_id=str(root / "step-1"), no_dist=True)
    spec = ModelSpec("rat", "debugmodel", model.args, "test")
    dcp_to_standalone(root / "step-1", root / "model", spec, log=lambda _: None)
    return root / "model"


def spoil_weight(name: str, index: tuple, value: float):
    def edit(folder: Path) -> None:
        path = str(folder / "model.safetensors")
        state = safetensors.torch.load_file(path)
        state[name][index] = value
        safetensors.torch.save_file(state, path)
    return edit


def assert_one_line(err: BaseException, pattern: str) -> None:
    message = str(err)
    assert "\n" not in message and re.search(pattern, message), message


# id -> (edit of a copy of the model folder, load() keyword arguments, error type, regex).
LOAD_CASES = {
    "nan-embedding-row": (spoil_weight("tok_embeddings.weight", (5,), float("nan")), {},
                          ModelFolderError, r"tok_embeddings.weight holds a non-finite weight "
                          r"nan at \[5, 0\].*export it again from a good checkpoint"),
    "inf-norm-weight": (spoil_weight("layers.0.ffn_norm.weight", (1,), float("-inf")), {},
                        ModelFolderError, r"ffn_norm.weight holds a non-finite weight -inf"),
    "absurd-ffn-weight": (spoil_weight("layers.1.feed_forward.w1.weight", (0, 3), 3.4e38), {},
                          ModelFolderError, r"w1.weight holds an absurd weight 3.4e\+38 at \[0, 3\]"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_refuses_bad_input(case, model_dir, tmp_path):
    edit, kwargs, error, pattern = LOAD_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    if edit is not None:
        edit(folder)
    with pytest.raises(error) as info:
        load(folder, **kwargs)
    assert_one_line(info.value, pattern)


def test_edited_config_warns_naming_the_fields(model_dir, tmp_path):
    """chunk_size and rope_base leave no trace in the weights: edits to them in config.json are
    caught against the configuration the converter recorded in model.safetensors."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(folder)  # untouched: no warning
    config = json.loads((folder / "config.json").read_text())
    config["args"].update(chunk_size=32, rope_base=500.0)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(ConfigMismatchWarning) as record:
        load(folder)
    assert_one_line(record[0].message, r"config.json was edited after export: chunk_size=32 "
                    r"\(exported with 16\), rope_base=500.0 \(exported with 10000.0\); .*"
                    r"restore those values or convert the checkpoint again")

"""torchtitan's Hugging Face checkpoint path and the transformers export, with the real trainer
(2 CPU ranks, FSDP2). From the shared seed exported for transformers (``--to-hf``), a run with
``initial_load_in_hf`` and ``last_save_in_hf`` has the losses of a run from the DCP seed and
saves the weights that run saves as DCP; the saved file reads back through the adapter and, with
the files the plugin writes beside it, loads as a transformers folder; and the trained model
exported for transformers generates what ``rat_plugin.generate`` does."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import launch, run_main, tb_losses

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

STEPS = 2
SMALL = ("--training.local_batch_size=2", "--training.seq_len=64", "--checkpoint.enable",
         "--checkpoint.interval=100")


def train(dump: Path, *options: str) -> dict[int, float]:
    run = launch("rat_debug.toml", dump, *SMALL, f"--training.steps={STEPS}", *options)
    assert run.returncode == 0, run.stdout[-4000:]
    if "--checkpoint.initial_load_in_hf" in options:  # the HF path ran, not a fresh init
        assert "loading from HF safetensors from --checkpoint.initial_load_path" in run.stdout
    return tb_losses(dump)


def dcp_weights(step: Path) -> dict[str, torch.Tensor]:
    entries = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()}
    dcp.load(state, checkpoint_id=str(step), no_dist=True)
    return state


@pytest.fixture(scope="module")
def runs(seed_checkpoint, tmp_path_factory):
    """The seed exported for transformers (``--to-hf``: save_pretrained's safetensors,
    RATForCausalLM's names), then a run from each seed."""
    root = tmp_path_factory.mktemp("hf_runs")
    seed = seed_checkpoint("rat_debug.toml")
    for argv in ([str(seed), str(root / "seed_folder"), "--config",
                  str(REPO / "train_configs" / "rat_debug.toml")],
                 [str(root / "seed_folder"), str(root / "hf_seed"), "--to-hf"]):
        assert convert_main(argv) == 0
    hf = train(root / "hf", f"--checkpoint.initial_load_path={root / 'hf_seed'}",
               "--checkpoint.initial_load_in_hf", "--checkpoint.last_save_in_hf")
    reference = train(root / "dcp", f"--checkpoint.initial_load_path={seed}")
    saved = {kind: root / kind / "checkpoint" / f"step-{STEPS}" for kind in ("hf", "dcp")}
    return dict(saved=saved, hf=hf, reference=reference)


@pytest.mark.slow
def test_initial_load_in_hf_trains_like_the_dcp_seed(runs):
    assert sorted(runs["hf"]) == list(range(1, STEPS + 1))
    for step, loss in runs["reference"].items():
        assert abs(runs["hf"][step] - loss) <= 1e-6, (step, runs["hf"][step], loss)


@pytest.mark.slow
def test_last_save_in_hf_holds_the_trained_weights_and_loads_back(runs):
    from rat_plugin.infra.state_dict_adapter import RATStateDictAdapter

    files = list(runs["saved"]["hf"].glob("*.safetensors"))
    assert len(files) == 1, files  # consolidated by torchtitan
    saved, twin = load_file(str(files[0])), dcp_weights(runs["saved"]["dcp"])
    assert set(saved) == {f"model.{k}" for k in twin if k != "output.weight"}
    for name, value in twin.items():
        if name != "output.weight":
            assert torch.equal(saved[f"model.{name}"], value), name
    # Read back as torchtitan's initial_load_in_hf does: to_hf names, HF reader, from_hf.
    adapter = RATStateDictAdapter(None, None)
    state = adapter.to_hf({k: torch.zeros_like(v) for k, v in twin.items()})
    dcp.load(state, storage_reader=adapter.get_hf_storage_reader(str(runs["saved"]["hf"])),
             no_dist=True)
    loaded = adapter.from_hf(state)
    assert loaded.keys() == twin.keys() and all(torch.equal(loaded[k], twin[k]) for k in twin)


@pytest.mark.slow
def test_trained_model_generates_the_same_through_transformers(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import rat_plugin.hf  # noqa: F401
    from rat_plugin.generate import generate, load

    folder, hf = tmp_path / "folder", tmp_path / "hf"
    argv = [str(runs["saved"]["dcp"]), str(folder), "--config",
            str(REPO / "train_configs" / "rat_debug.toml"), "--seq-len", "64"]
    for args in (argv, [str(folder), str(hf), "--to-hf"]):
        code, _, err = run_main(convert_main, args, capsys)
        assert code == 0, err
    prompts = [[1, 45, 97, 130, 31, 200, 17, 64, 90], [1, 300]]
    reference = generate(load(folder), prompts, 12).tokens
    model = AutoModelForCausalLM.from_pretrained(hf)
    ids = torch.tensor([prompts[0], [0] * 7 + prompts[1]])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [7]])).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert out[:, 9:].tolist() == reference


@pytest.mark.slow
def test_last_save_in_hf_is_a_transformers_folder(runs, tmp_path):
    """torchtitan writes an HF save's shards and index only; the plugin adds config.json, the
    generated code and the tokenizer, so the save loads with AutoModelForCausalLM and computes
    what its DCP twin's weights compute, its tokenizer starts texts with BOS as training did,
    and its config carries the record an edit is checked against."""
    import json
    import shutil
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rat_plugin.hf  # noqa: F401
    from rat_plugin.generate.loading import ConfigMismatchWarning
    from rat_plugin.model import RATModel

    folder = runs["saved"]["hf"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigMismatchWarning)
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_kind == "rat" and model.config.flavor == "debugmodel"
    assert model.config.scan_kernel == "auto" and model.config.max_seq_len == 64
    twin = RATModel(model.config.to_args())
    twin.load_state_dict(dcp_weights(runs["saved"]["dcp"]))
    ids = torch.tensor([[1, 45, 97, 130, 31, 200, 17, 64, 90]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Once upon a time").input_ids[0] == model.config.bos_token_id is not None
    shutil.copytree(folder, tmp_path / "edited", ignore=shutil.ignore_patterns("sharded"))
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "chunk_size": 32}))
    with pytest.warns(ConfigMismatchWarning, match=r"chunk_size=32 \(exported with 16\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "edited")

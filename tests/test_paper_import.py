"""Importing checkpoints of the paper's code (CLAIRE-Labo/RAT).

The checkpoints are built here from a project model by the paper code's layout (checked against
its code): a torch.save dict with the weights under "task" (prefixed "_orig_mod." by
torch.compile, the head tied to the embedding, fused in_proj rows z, v, g, q, k for RAT and
v, q, k for attention, RAT at even layers of the hybrid), the run's configuration as an
``easydict.EasyDict``, optimizer, lr_scheduler and step.
"""

import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import run_main
from oracle import model_loop
from rat_plugin.convert import ConversionError, spec_from_config
from rat_plugin.generate import load
from rat_plugin.model import RATModel, make_args
from rat_plugin.paper_checkpoint import (
    load_paper_model,
    paper_to_dcp,
    paper_to_standalone,
    read_paper_checkpoint,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
quiet = dict(log=lambda _: None)


class EasyDict(dict):
    """Like easydict.EasyDict: a dict whose items are also attributes, nested dicts converted."""

    def __init__(self, d=None):
        super().__init__()
        for k, v in (d or {}).items():
            setattr(self, k, v)

    def __setattr__(self, name, value):
        if isinstance(value, dict) and not isinstance(value, EasyDict):
            value = EasyDict(value)
        super().__setattr__(name, value)
        super().__setitem__(name, value)


def paper_state(model: RATModel) -> dict[str, torch.Tensor]:
    """The paper code's task.state_dict() of the same weights, compiled (prefixed)."""
    state = {"embedding.wte.weight": model.tok_embeddings.weight,
             "head.lm_head.weight": model.tok_embeddings.weight,
             "backbone.ln.weight": model.norm.weight}
    for i, block in model.layers.items():
        mixer, seq = block.mixer, f"backbone.layers.{i}.seq_layer"
        if hasattr(mixer, "wz"):  # RAT
            rows = (mixer.wz, mixer.wv, mixer.wg, mixer.wq, mixer.wk)
            state[f"{seq}.gate_bias"] = mixer.wg.bias
        else:
            rows = (mixer.wv, mixer.wq, mixer.wk)
        state[f"{seq}.in_proj.weight"] = torch.cat([r.weight for r in rows])
        state[f"{seq}.out_proj.weight"] = mixer.wo.weight
        state[f"{seq}.input_norm.weight"] = block.mixer_norm.weight
        ffn = f"backbone.layers.{i}.hidden_layer"
        state[f"{ffn}.fc1.weight"] = block.feed_forward.w1.weight
        state[f"{ffn}.fc2.weight"] = block.feed_forward.w2.weight
        state[f"{ffn}.ln.weight"] = block.ffn_norm.weight
    return {f"_orig_mod.{k}": v.detach().clone() for k, v in state.items()}


def paper_config(args) -> EasyDict:
    rat = {"_name_": "rat", "d_head": args.head_dim, "chunk_size": args.chunk_size, "ngroups": 2}
    backbone = {"_name_": "sequence", "seq_cell": rat, "hidden_cell": {"act_fn": "gelu"}}
    if args.swa_window is not None:
        backbone.update(_name_="sequence_interleave", seq_cell1=rat, seq_cell={
            "_name_": "local_attention", "window_size": args.swa_window})
    return EasyDict({"model": {"backbone": backbone, "embedding": {"pe": {"base": 10000}}},
                     "data": {"seq_len": args.max_seq_len}})


def save_paper_checkpoint(path: Path, state: dict, config=None) -> Path:
    """torch.save as the paper's trainer does, the config pickled as easydict.EasyDict."""
    module = types.ModuleType("easydict")
    module.EasyDict = EasyDict
    EasyDict.__module__ = "easydict"
    sys.modules["easydict"] = module
    try:
        first = next(iter(state.values()))
        torch.save({"task": state, "config": config, "step": 999,
                    "optimizer": {"state": {0: {"exp_avg": torch.zeros_like(first)}},
                                  "param_groups": [{"lr": 8e-4, "betas": (0.9, 0.95)}]},
                    "lr_scheduler": {"last_epoch": 999, "base_lrs": [8e-4]}}, path)
    finally:
        del sys.modules["easydict"]
        EasyDict.__module__ = __name__
    return path


def project_model(kind: str, **overrides) -> RATModel:
    torch.manual_seed(0)
    model = RATModel(make_args(kind, "debugmodel", **overrides))
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
def test_import_reproduces_the_source_logits(kind, tmp_path, capsys):
    # chunk size 8, not the flavor's 16: it must come from the checkpoint's configuration.
    model = project_model(kind, chunk_size=8, max_seq_len=128)
    ckpt = save_paper_checkpoint(tmp_path / "999.pth", paper_state(model), paper_config(model.args))
    code, out, err = run_main(convert_main, [str(ckpt), str(tmp_path / "out"), "--from-paper"],
                              capsys)
    assert code == 0, err
    assert f"kind={kind} flavor=debugmodel (from checkpoint shapes + checkpoint config" in out
    imported = load(tmp_path / "out")
    assert imported.args == model.args and imported.config["add_bos"] is False
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.args.vocab_size, (2, 96), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens), model(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
def test_an_fp64_import_equals_the_loop_oracle(kind, tmp_path):
    """The imported weights in an fp64 model give the logits the loop oracle computes from the
    source model's fp64 weights, to 1e-12: the mapping is exact and no step of the model drops
    to fp32 (a forget gate in fp32 capped this at ~1e-7)."""
    source = project_model(kind, chunk_size=4, max_seq_len=32).double()
    ckpt = save_paper_checkpoint(tmp_path / "1.pth", paper_state(source),
                                 paper_config(source.args))
    spec, state = load_paper_model(ckpt, **quiet)
    imported = RATModel(spec.args).double()
    imported.load_state_dict(state, strict=False)  # the tied head is the embedding
    tokens = torch.randint(0, spec.args.vocab_size, (2, 19),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens), model_loop(source, tokens), atol=1e-12,
                                   rtol=0)


def test_a_dcp_seed_of_a_model_the_flavor_cannot_build_is_refused(tmp_path, capsys):
    model = project_model("rat", chunk_size=8)
    ckpt = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model), paper_config(model.args))
    code, _, err = run_main(convert_main, [str(ckpt), str(tmp_path / "seed"), "--from-paper",
                                           "--to-dcp"], capsys)
    assert code == 1 and not (tmp_path / "seed").exists()
    assert re.search(r"the checkpoint's model has chunk_size=8 \(the flavor has 16\), which a "
                     r"training config of rat/debugmodel cannot set.* instead$", err.strip())


def test_a_named_flavor_to_a_dcp_seed(tmp_path):
    """Without a configuration, the flavor named (--model-name, --flavor) gives what shapes
    cannot; the DCP seed loads into a fresh model like torchtitan's initial_load_path does."""
    model = project_model("rat_swa")
    ckpt = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model))
    spec = paper_to_dcp(ckpt, tmp_path / "seed", spec_from_config(None, "rat_swa", "debugmodel"),
                        **quiet)
    assert (spec.kind, spec.flavor, spec.args) == ("rat_swa", "debugmodel", model.args)
    fresh = project_model("rat_swa", max_seq_len=256)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "seed"), no_dist=True)
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name


class TensorSubclass(torch.Tensor):
    pass


def test_tensors_saved_with_attributes_as_fsdp_saves_them(tmp_path):
    """FSDP's full state dict marks each tensor ``_has_been_cloned``, which pickles it through
    torch._tensor._rebuild_from_type_v2; only plain tensors are rebuilt that way."""
    model = project_model("rat")
    state = paper_state(model)
    for tensor in state.values():
        tensor._has_been_cloned = True
    read, _ = read_paper_checkpoint(save_paper_checkpoint(tmp_path / "fsdp.pth", state))
    want = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    assert read.keys() == want.keys()
    for name, tensor in read.items():
        assert type(tensor) is torch.Tensor and torch.equal(tensor, want[name]), name
    state[next(iter(state))] = torch.ones(2).as_subclass(TensorSubclass)
    with pytest.raises(ConversionError, match=r"is not a torch.save checkpoint \(UnpicklingError: "
                       r"a tensor of type .*TensorSubclass.* is not allowed\)"):
        read_paper_checkpoint(save_paper_checkpoint(tmp_path / "subclass.pth", state))


def test_unpickling_runs_no_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"task": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match="'task' is a pickled posix.system, not a dict"):
        paper_to_standalone(tmp_path / "evil.pth", tmp_path / "out", **quiet)
    assert not marker.exists() and not (tmp_path / "out").exists()


def spoiled(name: str):
    """A checkpoint edit for the table below."""
    def edit(state: dict) -> dict:
        if name == "untied":
            state["_orig_mod.head.lm_head.weight"] = state["_orig_mod.head.lm_head.weight"] + 1
        elif name == "rnn":
            key = "_orig_mod.backbone.layers.1.seq_layer.in_proj.weight"
            state[key] = torch.zeros(5 * 128 + 1, 128)
        elif name == "rnn-layer":  # the paper's RNN cell: in_proj rows z, v, g and a gate bias
            key = "_orig_mod.backbone.layers.0.seq_layer.in_proj.weight"
            state[key] = state[key][: 3 * state[key].shape[1]]
        elif name == "bias":
            state["_orig_mod.backbone.layers.0.hidden_layer.fc1.bias"] = torch.zeros(512)
        elif name == "nan":
            state["_orig_mod.backbone.ln.weight"][3] = float("nan")
        elif name == "nan-tied-embedding":  # one tensor saved under both names, as tied
            embedding = state["_orig_mod.embedding.wte.weight"]
            embedding[7, 2] = float("nan")
            state["_orig_mod.head.lm_head.weight"] = embedding
        return state
    return edit


# id -> (how the source file is made, regex of the one-line error).
BAD_SOURCES = {
    "missing": (None, r"checkpoint file .*missing.pth does not exist"),
    "folder": ("folder", r"is a folder: --from-paper takes the .pth file"),
    "garbage": (b"\x80\x02garbage", r"is not a torch.save checkpoint \(UnpicklingError"),
    "truncated": ("truncated", r"is not a torch.save checkpoint"),
    "no-task": ({"model": {"w": torch.ones(2)}}, r"has no 'task' weights.*\(found: model\)"),
    "unnamed-weights": ({"task": {0: torch.ones(2), "w": torch.ones(2)}},
                        r"'task' keys that are not weight names: 0$"),
    "untied": (spoiled("untied"), r"head.lm_head.weight differs from embedding.wte.weight"),
    "rnn": (spoiled("rnn"), r"layer 1's in_proj has 641 rows, neither RAT's 3D \+ 2Gd"),
    "rnn-layer": (spoiled("rnn-layer"), r"RNN layers of the paper's code \(a gate bias and a "
                                        r"3D-row in_proj\) at layer\(s\) 0, which no model here"),
    "bias": (spoiled("bias"), r"weights that no RAT.*has: backbone.layers.0.hidden_layer.fc1.bias"),
    "nan": (spoiled("nan"), r"backbone.ln.weight holds a non-finite weight nan at \[3\]"),
    # Checked before the tie, so NaN is not reported as "head differs from embedding".
    "nan-tied-embedding": (spoiled("nan-tied-embedding"),
                           r"(embedding.wte|head.lm_head).weight holds a non-finite weight nan at "
                           r"\[7, 2\] .*: the checkpoint is corrupt"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_give_one_line(case, tmp_path, capsys):
    make, pattern = BAD_SOURCES[case]
    src = tmp_path / f"{case}.pth"
    if make == "folder":
        src.mkdir()
    elif isinstance(make, bytes):
        src.write_bytes(make)
    elif isinstance(make, dict):
        torch.save(make, src)
    elif make == "truncated":
        save_paper_checkpoint(src, paper_state(project_model("rat")))
        src.write_bytes(src.read_bytes()[:5000])
    elif make is not None:
        save_paper_checkpoint(src, make(paper_state(project_model("rat"))))
    code, out, err = run_main(convert_main, [str(src), str(tmp_path / "out"), "--from-paper"],
                              capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def edited(**paths):
    """A configuration edit for the table below: dotted path -> new value."""
    def edit(config: EasyDict) -> EasyDict:
        for path, value in paths.items():
            *sections, key = path.split(".")
            section = config
            for name in sections:
                section = section[name]
            dict.__setitem__(section, key, value)
        return config
    return edit


# id -> (edit of the paper configuration of a debug rat model, or what replaces it; regex of the
# one-line error).
BAD_CONFIGS = {
    "zero-seq-len": (edited(**{"data.seq_len": 0}), r"data.seq_len=0 in the checkpoint's "
                                                    r"configuration must be a positive integer"),
    "negative-seq-len": (edited(**{"data.seq_len": -128}), r"data.seq_len=-128 .*positive integer"),
    "string-chunk-size": (edited(**{"model.backbone.seq_cell.chunk_size": "8"}),
                          r"model.backbone.seq_cell.chunk_size='8' .* must be a positive integer"),
    "string-for-a-section": (edited(**{"model.backbone": "sequence"}),
                             r"model.backbone='sequence' in the checkpoint's configuration must "
                             r"be a section"),
    "string-for-the-configuration": ("rat", r"'config' is 'rat', not the run's configuration"),
    "list-for-a-name": (edited(**{"model.backbone.seq_cell._name_": ["rat"]}),
                        r"model.backbone.seq_cell._name_=\['rat'\] .* must be a name"),
    "infinite-rope-base": (edited(**{"model.embedding.pe.base": float("inf")}),
                           r"model.embedding.pe.base=inf .* must be a positive finite number"),
    "no-chunk-size": (edited(**{"model.backbone.seq_cell.chunk_size": None}),
                      r"names no chunk_size \(model.backbone.seq_cell.chunk_size\) for its RAT "
                      r"layers: pass --model-name and --flavor to take that flavor's"),
    "no-configuration": (None, r"holds no configuration \('config'\): its chunk size, window, "
                               r"RoPE base and training length leave no trace in the weights.*"
                               r"pass --model-name and --flavor to take that flavor's"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configurations_give_one_line(case, tmp_path, capsys):
    edit, pattern = BAD_CONFIGS[case]
    model = project_model("rat")
    config = edit(paper_config(model.args)) if callable(edit) else edit
    src = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model), config)
    for to_dcp in ([], ["--to-dcp"]):
        code, out, err = run_main(convert_main, [str(src), str(tmp_path / "out"),
                                                 "--from-paper", *to_dcp], capsys)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(pattern, err), err
        assert not (tmp_path / "out").exists()


def test_without_configuration_the_named_flavor_is_taken(tmp_path, capsys):
    """Asked for by name, the flavor's chunk size (and the rest) is taken, saying so."""
    model = project_model("rat")
    src = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model))
    code, out, err = run_main(convert_main, [str(src), str(tmp_path / "out"), "--from-paper",
                                             "--model-name", "rat", "--flavor", "debugmodel"],
                              capsys)
    assert code == 0, err
    assert re.search(r"no configuration: chunk_size=16, rope_base=10000.0, max_seq_len=256 are "
                     r"rat/debugmodel's", out), out
    assert load(tmp_path / "out").args == model.args


def test_shapes_no_flavor_has_are_named(tmp_path, capsys):
    """Four query/key groups where the debug flavor has two: no flag can fit it, so none is
    suggested; the nearest flavor and the weights that differ are named."""
    model = project_model("rat", n_groups=4)
    src = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model), paper_config(model.args))
    code, _, err = run_main(convert_main, [str(src), str(tmp_path / "out"), "--from-paper"],
                            capsys)
    assert code == 1 and err.count("\n") == 1 and "--flavor" not in err, err
    assert re.search(r"its shapes fit no model here: the nearest, rat/debugmodel, has shape "
                     r"mismatches \(weights != model\): layers.0.mixer.wk.weight \(128, 128\) "
                     r"!= \(64, 128\), .*; models of other sizes cannot be converted$", err), err


def test_fp64_weights_import_as_fp32(tmp_path, capsys):
    """The folders hold fp32, bf16 or fp16 (what the loader takes): fp64 weights are written
    as fp32, saying so, and load."""
    model = project_model("rat").double()
    src = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model), paper_config(model.args))
    code, out, err = run_main(convert_main, [str(src), str(tmp_path / "out"), "--from-paper"],
                              capsys)
    assert code == 0, err
    assert "dtype: the weights are float64, which model folders do not hold (fp32, bf16, fp16): "\
           "written as fp32 (--dtype chooses)" in out, out
    imported = load(tmp_path / "out")
    assert imported.config["dtype"] == "fp32"
    assert torch.equal(imported.tok_embeddings.weight, model.tok_embeddings.weight.float())


def test_another_interleaving_is_refused(tmp_path, capsys):
    """Attention and local attention layers have the same shapes: only the configuration tells
    that every third layer, not every second, is global."""
    model = project_model("rat_attn_swa")
    config = paper_config(model.args)
    config.model.backbone.update(seq_cell1={"_name_": "attention"}, interleave_step=3)
    src = save_paper_checkpoint(tmp_path / "1.pth", paper_state(model), config)
    code, _, err = run_main(convert_main, [str(src), str(tmp_path / "out"), "--from-paper"],
                            capsys)
    assert code == 1 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "interleave_step=3 in the configuration, but the hybrids here alternate" in err
    config.model.backbone.interleave_step = 2  # the same file as the paper writes it imports
    save_paper_checkpoint(src, paper_state(model), config)
    assert run_main(convert_main, [str(src), str(tmp_path / "out"), "--from-paper"],
                    capsys)[0] == 0


def test_a_file_without_the_flag_is_pointed_to_it(tmp_path, capsys):
    (tmp_path / "1.pth").write_bytes(b"x")
    code, _, err = run_main(convert_main, [str(tmp_path / "1.pth"), str(tmp_path / "out")], capsys)
    assert code == 1 and "is a file: pass --from-paper" in err


def test_the_configuration_comes_from_the_checkpoint(tmp_path, capsys):
    src = save_paper_checkpoint(tmp_path / "1.pth", paper_state(project_model("rat")))
    argv = [str(src), str(tmp_path / "out"), "--from-paper", "--config", "train.toml"]
    code, _, err = run_main(convert_main, argv, capsys)
    assert code == 1 and "reads the configuration from the checkpoint: drop --config" in err

"""Hugging Face transformers: the exported folder loads with AutoModelForCausalLM (through
rat_plugin's classes, and where rat_plugin cannot be imported through the code the export
carries, generated from the package's source), round-trips through save_pretrained, and
generate() gives rat_plugin.generate's tokens and logits while feeding one token per forward
after the prefill (RAT's caches, no recomputation); forward() hands its cache to a decoding loop
written by hand; loading an export checks what loading a standalone folder checks."""

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rat_plugin.hf  # noqa: F401  (registers model type "rat")
from conftest import lively_folder, run_main
from rat_plugin.generate import generate, load
from rat_plugin.hf import RATForCausalLM
from rat_plugin.model import RATModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from convert_checkpoint import main as convert_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 9, 33, 2, 17, 40, 41, 7, 8, 100, 3], [11, 12, 13]]  # lengths 11 and 3


def export(folder: Path, out: Path, capsys) -> Path:
    code, _, err = run_main(convert_main, [str(folder), str(out), "--to-hf"], capsys)
    assert code == 0, err
    return out


def hf_generate(model, prompts, new_tokens):
    """Greedy generate() on a left-padded batch: (new tokens per prompt, logits per step)."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, longest:].tolist(), torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
def test_generate_matches_and_decodes_from_the_cache(kind, tmp_path, capsys):
    folder = lively_folder(kind, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(export(folder, tmp_path / "hf", capsys)).eval()
    assert isinstance(model, RATForCausalLM)
    fed = []
    forward = model.model.forward
    model.model.forward = lambda tokens, *a, **k: fed.append(tokens.shape[1]) or forward(
        tokens, *a, **k)
    tokens, logits = hf_generate(model, PROMPTS, 24)
    reference = generate(load(folder), PROMPTS, 24, return_logits=True)
    assert tokens == reference.tokens
    assert len(set(tokens[0])) > 3, "degenerate continuation: the comparison would be weak"
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(logits[i], reference.logits[i], atol=1e-5, rtol=0)
    # One prefill of the padded prompts, then one token per step: no recomputation.
    assert fed == [11] + [1] * 23


def test_save_pretrained_round_trips(small_model_dir, tmp_path, capsys):
    hf = export(small_model_dir, tmp_path / "hf", capsys)
    assert AutoConfig.from_pretrained(hf).model_type == "rat"
    first = AutoModelForCausalLM.from_pretrained(hf)
    first.save_pretrained(tmp_path / "again")
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    source = load(small_model_dir).state_dict()
    for model in (first, second):
        state = model.model.state_dict()
        assert state.keys() == source.keys()
        assert all(torch.equal(state[k], source[k]) for k in source)
        assert model.model.output.weight is model.model.tok_embeddings.weight
    assert second.config.to_args() == load(small_model_dir).args
    assert second.config.eos_token_id is not None  # from the tokenizer: generate stops there
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(second(tokens).logits, load(small_model_dir)(tokens))


def test_unsupported_use_is_one_line(small_model_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(export(small_model_dir, tmp_path / "hf", capsys))
    ids = torch.tensor([[5, 6, 7, 0]])
    cases = {
        "beam search": (dict(num_beams=2), "generation mode beam_search is not supported"),
        "right padding": (dict(attention_mask=torch.tensor([[1, 1, 1, 0]])),
                          "attention_mask must be left padding"),
        "chunked prefill": (dict(prefill_chunk_size=2), "prefill_chunk_size is not supported"),
        "hidden states": (dict(output_hidden_states=True, return_dict_in_generate=True),
                          "output_hidden_states is not supported"),
    }
    for name, (kwargs, message) in cases.items():
        with pytest.raises(ValueError) as info:
            model.generate(ids, max_new_tokens=2, pad_token_id=0, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value), name
    code, _, err = run_main(convert_main, [str(small_model_dir), str(tmp_path / "hf"), "--to-hf"],
                            capsys)
    assert code == 1 and "already exists: pass --force" in err
    with pytest.raises(ValueError, match=r"^\S*hf is a transformers folder \(model_type 'rat'\), not "
                       r"a standalone one: load it with AutoModelForCausalLM"):
        load(tmp_path / "hf")


@pytest.fixture
def lively(tmp_path, capsys):
    folder = lively_folder("rat", tmp_path)
    return folder, AutoModelForCausalLM.from_pretrained(export(folder, tmp_path / "hf", capsys))


def test_padded_rows_without_a_cache_compute_as_alone(lively):
    """Left and right padding in a plain forward (Trainer batches, generate(use_cache=False)):
    every row's logits are its logits alone, from its first token."""
    folder, model = lively
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[1][:2]]
    with torch.no_grad():
        alone = [model(torch.tensor([r])).logits[0] for r in rows]
        for side in ("left", "right"):
            pad = [[0] * (11 - len(r)) for r in rows]
            ids = torch.tensor([p + r if side == "left" else r + p for p, r in zip(pad, rows)])
            mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else
                                 [1] * len(r) + [0] * len(p) for p, r in zip(pad, rows)])
            logits = model(ids, attention_mask=mask).logits
            for row, (p, want) in enumerate(zip(pad, alone)):
                got = logits[row, len(p):] if side == "left" else logits[row, : 11 - len(p)]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    uncached = model.generate(torch.tensor([[0] * 8 + PROMPTS[1], PROMPTS[0]]), max_new_tokens=6,
                              attention_mask=torch.tensor([[0] * 8 + [1] * 3, [1] * 11]),
                              use_cache=False, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert uncached[:, 11:].tolist() == generate(load(folder), [PROMPTS[1], PROMPTS[0]], 6).tokens


def test_a_new_model_gets_the_rat_init(lively):
    """transformers skips _init_weights for a module without parameters of its own (RATModel):
    from_config must still give RATModel.init_weights, and from_pretrained the loaded weights."""
    _, loaded = lively
    fresh = AutoModelForCausalLM.from_config(loaded.config).model.state_dict()
    reference = RATModel(loaded.config.to_args())
    reference.init_weights()
    for name, value in reference.state_dict().items():  # the same distributions
        got = fresh[name]
        if value.std() == 0:  # constant inits (norm gains)
            assert torch.equal(got, value), name
        else:
            assert abs(got.std() - value.std()) < 0.2 * value.std(), name
            assert abs(got.mean() - value.mean()) < 0.2 * value.std() + 1e-3, name
    source = load(lively[0]).state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in source.items())


def test_loss_follows_the_trainer_through_gradient_accumulation(lively, tmp_path):
    """The Trainer passes num_items_in_batch to a forward taking **kwargs and then does not
    divide by the accumulation steps: the loss must be the sum over num_items_in_batch."""
    from transformers import Trainer, TrainingArguments

    _, model = lively
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(1, 256, (8, 12), generator=generator)]
    logs = {}
    for steps in (1, 4):
        arguments = TrainingArguments(
            output_dir=str(tmp_path / f"ga{steps}"), per_device_train_batch_size=8 // steps,
            gradient_accumulation_steps=steps, max_steps=1, learning_rate=0.0, logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, dataloader_drop_last=False)
        trainer = Trainer(model=model, args=arguments, train_dataset=data)
        trainer.train()
        logs[steps] = next(h for h in trainer.state.log_history if "loss" in h)
    with torch.no_grad():
        ids = torch.stack([d["input_ids"] for d in data])
        want = model(ids, labels=ids).loss.item()
    for steps in (1, 4):
        assert logs[steps]["loss"] == pytest.approx(want, rel=1e-4), steps
    assert logs[4]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-4)


def test_labels_with_logits_to_keep(lively):
    _, model = lively
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full, kept = model(ids, labels=ids), model(ids, labels=ids, logits_to_keep=1)
    assert kept.logits.shape == (1, 1, 256) and kept.loss == full.loss
    torch.testing.assert_close(kept.logits[0, 0], full.logits[0, -1])


def test_resize_token_embeddings_keeps_the_head_tied(lively, tmp_path):
    folder, model = lively
    model.resize_token_embeddings(260)
    assert model.model.output.weight is model.model.tok_embeddings.weight
    assert model.config.vocab_size == model.config.to_args().vocab_size == 260
    ids = torch.tensor([PROMPTS[1] + [258]])
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (1, 4, 260)
        torch.testing.assert_close(logits[:, :3, :256], load(folder)(ids[:, :3]))
    model.save_pretrained(tmp_path / "resized")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resized")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits)


@pytest.mark.parametrize("add_bos", [True, False], ids=["bos", "no-bos-llama-style"])
def test_auto_tokenizer_encodes_as_the_model_was_trained(add_bos, small_model_dir, tmp_path,
                                                         capsys):
    """The debug tokenizer.json adds no BOS by itself, a Llama one always does: the export's
    AutoTokenizer must follow the folder's add_bos (the paper's imports have none)."""
    import json
    import shutil

    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from rat_plugin.generate import load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    bos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|begin_of_text|>")
    if not add_bos:  # a Llama-style tokenizer.json, in a folder trained without BOS
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
        tokenizer.save(str(folder / "tokenizer.json"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "add_bos": False}))
    text = "Once upon a time, Anna saw a dog."
    ids = load_tokenizer(folder).encode(text, add_special_tokens=False).ids
    hf = export(folder, tmp_path / "hf", capsys)
    assert AutoTokenizer.from_pretrained(hf)(text).input_ids == [bos] * add_bos + ids


@pytest.mark.parametrize("kind", ["rat", "rat_swa", "rat_attn"])
def test_hand_written_decoding_loop_equals_full_recomputation(kind, tmp_path, capsys):
    """``out = model(ids, use_cache=True)`` then ``model(next, past_key_values=...)``, as
    written by hand: each step's logits equal a full forward of the tokens so far, also past
    twice the prompt (the cache grows) and for a batch with left and right padding."""
    model = AutoModelForCausalLM.from_pretrained(
        export(lively_folder(kind, tmp_path), tmp_path / "hf", capsys)).eval()
    rows = [PROMPTS[0], PROMPTS[1]]
    for side in ("left", "right"):
        pad = [[0] * (11 - len(r)) for r in rows]
        ids = torch.tensor([p + r if side == "left" else r + p for p, r in zip(pad, rows)])
        mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else
                             [1] * len(r) + [0] * len(p) for p, r in zip(pad, rows)])
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            assert out.past_key_values is not None
            torch.testing.assert_close(out.logits, model(ids, attention_mask=mask,
                                                         use_cache=False).logits, rtol=0, atol=0)
            last = torch.tensor([10, 2]) if side == "right" else torch.tensor([10, 10])
            tokens = [list(r) for r in rows]
            logits = out.logits[torch.arange(2), last]
            for _ in range(25):
                new = logits.argmax(-1)
                for row, token in zip(tokens, new.tolist()):
                    row.append(token)
                out = model(new[:, None], past_key_values=out.past_key_values)
                logits = out.logits[:, -1]
                for i, row in enumerate(tokens):
                    full = model(torch.tensor([row]), use_cache=False).logits[0, -1]
                    torch.testing.assert_close(logits[i], full, atol=1e-5, rtol=0)
        assert len(set(tokens[0][11:])) > 3, "degenerate continuation: the comparison is weak"


def test_use_cache_follows_the_config_and_return_dict_false_is_a_tuple(lively):
    _, model = lively
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert model(ids).past_key_values is not None  # config.use_cache, true by default
        model.config.use_cache = False
        assert model(ids).past_key_values is None
        assert model(ids, use_cache=True).past_key_values is not None
        model.config.use_cache = True
        assert model(ids, labels=ids).past_key_values is None  # a training forward
        logits, cache = model(ids, return_dict=False)
        torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=0)
        assert cache.get_seq_length() == len(PROMPTS[0])
        loss, logits = model(ids, labels=ids, return_dict=False)
        assert loss.dim() == 0 and logits.shape == (1, 11, 256)
        with pytest.raises(ValueError, match="labels need a forward without a decoding cache"):
            model(ids, labels=ids, use_cache=True)


def spoil_hf(name: str, index: tuple, value: float):
    def edit(folder: Path) -> None:
        import safetensors.torch

        path = str(folder / "model.safetensors")
        with safetensors.safe_open(path, "pt") as f:
            metadata = f.metadata()
        state = safetensors.torch.load_file(path)
        state[name][index] = value
        safetensors.torch.save_file(state, path, metadata=metadata)
    return edit


def edit_hf_config(**fields):
    def edit(folder: Path) -> None:
        import json

        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return edit


def drop_hf_weight(name: str):
    def edit(folder: Path) -> None:
        import safetensors.torch

        path = str(folder / "model.safetensors")
        with safetensors.safe_open(path, "pt") as f:
            metadata = f.metadata()
        state = safetensors.torch.load_file(path)
        del state[name]
        safetensors.torch.save_file(state, path, metadata=metadata)
    return edit


# id -> (edit of a copy of the export, from_pretrained keyword arguments, regex of the one-line
# ValueError). The checks of a standalone folder's load(), on an export.
HF_LOAD_CASES = {
    "nan-embedding-row": (spoil_hf("model.tok_embeddings.weight", (5,), float("nan")), {},
                          r"model.tok_embeddings.weight holds a non-finite weight nan at \[5, 0\] "
                          r"\(weights must be finite and within \+-10000\).*export it again"),
    "inf-norm-weight": (spoil_hf("model.layers.0.ffn_norm.weight", (1,), float("-inf")), {},
                        r"model.layers.0.ffn_norm.weight holds a non-finite weight -inf at \[1\]"),
    "absurd-ffn-weight": (spoil_hf("model.layers.1.feed_forward.w1.weight", (0, 3), 3.4e38), {},
                          r"w1.weight holds an absurd weight 3.4e\+38 at \[0, 3\]"),
    "missing-weight": (drop_hf_weight("model.layers.1.mixer.wq.weight"), {},
                       r"do not fit its config.json \(missing keys: "
                       r"model.layers.1.mixer.wq.weight\): export it again"),
    "edited-ffn-width": (edit_hf_config(ffn_hidden_dim=96), {},
                         r"do not fit its config.json \(shape mismatches \(weights != config\): "
                         r"model.layers.0.feed_forward.w1.weight \(128, 64\) != \(96, 64\), "),
    "unknown-dtype-in-config": (edit_hf_config(dtype="fp8"), {},
                                r"dtype='fp8' is not a model dtype: use one of bf16, fp16, fp32"),
}


@pytest.mark.parametrize("case", list(HF_LOAD_CASES))
def test_from_pretrained_refuses_what_load_refuses(case, small_model_dir, tmp_path, capsys):
    edit, kwargs, pattern = HF_LOAD_CASES[case]
    hf = export(small_model_dir, tmp_path / "hf", capsys)
    edit(hf)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(hf, **kwargs)
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_edited_export_config_warns_and_our_dtype_names_load(small_model_dir, tmp_path, capsys):
    """chunk_size and rope_base leave no trace in the weights: an export records the
    configuration it was written with, and from_pretrained names the fields edited since, as
    load() does for a standalone folder. config.json may use our dtype names (bf16, fp32)."""
    import warnings

    from rat_plugin.generate.loading import ConfigMismatchWarning

    hf = export(small_model_dir, tmp_path / "hf", capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigMismatchWarning)
        AutoModelForCausalLM.from_pretrained(hf)  # untouched: no warning
    edit_hf_config(dtype="bf16", chunk_size=32, rope_base=500.0)(hf)
    with pytest.warns(ConfigMismatchWarning) as record:
        model = AutoModelForCausalLM.from_pretrained(hf)
    message = str(record[0].message)
    assert "\n" not in message and re.search(
        r"config.json was edited after export: chunk_size=32 \(exported with 16\), "
        r"rope_base=500.0 \(exported with 10000.0\); .*restore those values", message), message
    assert model.dtype == torch.bfloat16
    edit_hf_config(dtype="fp32", chunk_size=16, rope_base=10000.0)(hf)
    assert AutoModelForCausalLM.from_pretrained(hf).dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(hf, dtype="bf16").dtype == torch.bfloat16


def test_export_code_is_generated_from_the_model_source(small_model_dir, tmp_path, capsys):
    """The export's code is what the generator makes now from rat_plugin's source (so there is
    one implementation), the same on every run, and named by config.json's auto_map."""
    import json

    from rat_plugin.hf import remote_code

    files = remote_code.render()
    assert files == remote_code.render()
    hf = export(small_model_dir, tmp_path / "hf", capsys)
    assert {name: (hf / name).read_text() for name in files} == files
    assert json.loads((hf / "config.json").read_text())["auto_map"] == remote_code.AUTO_MAP
    modeling = files["modeling_rat.py"]
    assert "GPU_PROGRAMS = False" in modeling and "class RATModel(nn.Module)" in modeling
    # What transformers requires installed before it runs the code (optional imports aside).
    from transformers.dynamic_module_utils import get_imports

    needed = {package for name in files for package in get_imports(hf / name)}
    assert needed - sys.stdlib_module_names == {"torch", "transformers", "safetensors"}


@pytest.mark.parametrize("source,error", [
    ("import numpy\n\n\ndef f():\n    return numpy\n", r"imports numpy: the export may depend on "
     r"torch, transformers, safetensors and the standard library only"),
    ("from rat_plugin.ops.rope import apply_rope\n\n\ndef rope_angles():\n    return apply_rope\n",
     r"rope_angles is defined in rat_plugin.ops.rope and extra_module: rename one"),
    ("def f():\n    from rat_plugin.data.tokenizer import read_tokenizer\n    return 1\n",
     r"extra_module imports rat_plugin.data.tokenizer: add it to SOURCES or LEFT_OUT"),
])
def test_the_generator_refuses_what_it_cannot_copy(source, error, tmp_path, monkeypatch):
    from rat_plugin.hf import remote_code

    (tmp_path / "extra_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(remote_code, "SOURCES", (*remote_code.SOURCES, "extra_module"))
    monkeypatch.setitem(remote_code.FILES, "modeling_rat.py", ("RATForCausalLM", "f"))
    with pytest.raises(remote_code.GeneratorError, match=error):
        remote_code.render()


def test_force_replaces_an_export_of_ours_only(small_model_dir, tmp_path, capsys):
    """--to-hf --force replaces a folder it wrote; a save_pretrained copy of it (same model
    type, a model.safetensors, but not the writer's record) it refuses."""
    hf = export(small_model_dir, tmp_path / "hf", capsys)
    argv = [str(small_model_dir), str(hf), "--to-hf", "--force"]
    assert run_main(convert_main, argv, capsys)[0] == 0
    AutoModelForCausalLM.from_pretrained(hf).save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "modeling_rat.py").is_file()  # auto_map's code goes along
    code, _, err = run_main(convert_main, [str(small_model_dir), str(tmp_path / "copy"), "--to-hf",
                                           "--force"], capsys)
    assert code == 1 and "copy exists and is not a folder this tool wrote" in err


@pytest.mark.slow
def test_export_loads_generates_and_trains_without_rat_plugin(isolated_export):
    """tests/isolated_export.py, in an interpreter where rat_plugin cannot be imported: the
    generated code's logits equal rat_plugin's bit for bit, its greedy tokens
    rat_plugin.generate's, a hand-written decoding loop full recomputation, one Trainer step
    has the loss of rat_plugin's logits, and its load-time checks are the package's."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    spec, results = isolated_export, isolated_export["results"]
    assert results["module"].startswith("transformers_modules.")
    assert results["foreign_modules"] == []
    model = load(spec["lively_source"])
    tensors = load_file(str(Path(spec["out"]) / "tensors.safetensors"))
    with torch.no_grad():
        assert torch.equal(tensors["logits"], model(torch.tensor(spec["ids"])))
        rows = torch.tensor(spec["train"])
        logits = model(rows)
    reference = generate(model, spec["prompts"], spec["new_tokens"]).tokens
    assert results["generated"] == reference
    assert all(len(set(tokens)) > 3 for tokens in reference), "degenerate continuations"
    assert results["loop_max_diff"] < 1e-5
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
    assert results["train_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert results["trained_changed"] and results["trained_finite"] and results["copy_equal"]
    assert re.search(r"out/nan: model.norm.weight holds a non-finite weight nan at \[3\] "
                     r"\(weights must be finite", results["nan"])
    assert [re.search(r"edited/config.json was edited after export: chunk_size=8 \(exported "
                      r"with 4\); ", w) is not None for w in results["edit_warnings"]] == [True]
    assert results["bf16_dtype"] == "torch.bfloat16"

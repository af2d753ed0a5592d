"""Python API surface (rat_plugin.generate.load / generate), one table row per bad input: a
ValueError or TypeError raised at the boundary, one line naming the argument and the fix, or
the correct behaviour."""

import re
import shutil
import warnings

import pytest
import torch

from folder_edits import edit_config, spoil_weight, write
from rat_plugin.generate import ModelFolderError, cache_bytes, generate, load, load_tokenizer
from rat_plugin.generate.loading import ConfigMismatchWarning

pytestmark = pytest.mark.usefixtures("one_thread")


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
    "int-dtype": (None, dict(dtype=torch.int32), ValueError, r"dtype=torch.int32 is not a "
                  r"supported model dtype: choose one of \['bf16', 'fp16', 'fp32'\]"),
    "unknown-dtype-name": (None, dict(dtype="fp8"), ValueError, r"dtype='fp8' is not a supported"),
    "dtype-not-a-dtype": (None, dict(dtype=3), TypeError, r"dtype=3 is a int: give one of "
                          r"\['bf16', 'fp16', 'fp32'\] or a torch dtype"),
    "unknown-device": (None, dict(device="tpu"), ValueError, r"^device='tpu': use cpu or cuda\[:N\]$"),
    "device-not-a-string": (None, dict(device=0.5), TypeError, r"device=0.5 is a float: give a "
                            r"device such as 'cpu'"),
    "float-n-heads-in-config": (edit_config(n_heads=4.0), {}, ModelFolderError,
                                r"config.json is invalid \(n_heads=4.0 must be an integer\)"),
    "string-rope-base-in-config": (edit_config(rope_base="1e4"), {}, ModelFolderError,
                                   r"\(rope_base='1e4' must be a positive finite number\)"),
    "add-bos-not-a-bool": (write("config.json", '{"args": {}, "add_bos": "no"}'), {},
                           ModelFolderError, r"\(add_bos='no' must be true or false\)"),
    # On a machine without CUDA (simulated), not "convert the checkpoint again".
    "cuda-without-cuda": (None, dict(device="cuda"), ValueError,
                          r"^device='cuda': CUDA is not available on this machine: use cpu$"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_refuses_bad_input(case, small_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    edit, kwargs, error, pattern = LOAD_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    if edit is not None:
        edit(folder)
    with pytest.raises(error) as info:
        load(folder, **kwargs)
    assert_one_line(info.value, pattern)


def test_edited_config_warns_naming_the_fields(small_model_dir, tmp_path):
    """chunk_size and rope_base leave no trace in the weights: edits to them in config.json are
    caught against the configuration the converter recorded in model.safetensors."""
    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(folder)  # untouched: no warning
    edit_config(chunk_size=32, rope_base=500.0)(folder)
    with pytest.warns(ConfigMismatchWarning) as record:
        load(folder)
    assert_one_line(record[0].message, r"config.json was edited after export: chunk_size=32 "
                    r"\(exported with 16\), rope_base=500.0 \(exported with 10000.0\); .*"
                    r"restore those values or convert the checkpoint again")


# id -> (edit of a copy of the model folder, regex of the ModelFolderError of load_tokenizer).
TOKENIZER_CASES = {
    "empty-object": (write("tokenizer.json", "{}"), r"tokenizer.json is not a valid tokenizer "
                     r"\(Model missing. at line 1 column 2\): convert again with --tokenizer DIR"),
    "not-json": (write("tokenizer.json", "garbage"), r"tokenizer.json is not a valid tokenizer"),
    "missing": (lambda folder: (folder / "tokenizer.json").unlink(),
                r"has no tokenizer.json: convert with --tokenizer DIR, or pass token ids"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_load_tokenizer_names_the_bad_file(case, small_model_dir, tmp_path):
    edit, pattern = TOKENIZER_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    edit(folder)
    with pytest.raises(ModelFolderError) as info:
        load_tokenizer(folder)
    assert_one_line(info.value, pattern)


PROMPTS = [[1, 2, 3], [4, 5]]
# id -> (generate() keyword arguments replacing the defaults, error type, regex).
GENERATE_CASES = {
    "flat-list-of-ids": (dict(prompts=[1, 2, 3]), TypeError,
                         r"prompts is a flat list of token ids \[1, 2, 3\]...: give a list of "
                         r"prompts, e.g. \[\[1, 450, 338\]\] for one"),
    "text-prompt": (dict(prompts=["Once upon"]), TypeError,
                    r"prompt 0 is a str \('Once upon'\): give a list of token ids \(tokenize"),
    "prompts-not-a-list": (dict(prompts=7), TypeError, r"prompts is a int: give a list of token"),
    "float-ids": (dict(prompts=[[1, 2.0], [3]]), TypeError,
                  r"prompt 0 holds non-integer token ids \[2.0\]: give ints \(floats are not "
                  r"truncated\)"),
    "float-tensor-prompt": (dict(prompts=[torch.tensor([1.0, 2.0])]), TypeError,
                            r"prompt 0 is a 1-D torch.float32 tensor: give a 1-D integer tensor"),
    "id-outside-vocab": (dict(prompts=[[1, 1024]]), ValueError,
                         r"prompt 0 has token ids outside the vocabulary \[0, 1024\): \[1024\]"),
    "empty-prompt": (dict(prompts=[[1], []]), ValueError, r"prompt 1 is empty"),
    "no-prompts": (dict(prompts=[]), ValueError, r"prompts must be a non-empty list"),
    "max-new-tokens-none": (dict(max_new_tokens=None), TypeError,
                            r"max_new_tokens=None is a NoneType: give a whole number of tokens"),
    "max-new-tokens-fraction": (dict(max_new_tokens=2.5), TypeError,
                                r"max_new_tokens=2.5 is a float: give a whole number"),
    "max-new-tokens-zero": (dict(max_new_tokens=0), ValueError, r"max_new_tokens=0 must be >= 1"),
    "max-new-tokens-1e30": (dict(max_new_tokens=10**30), ValueError,
                            r"max_new_tokens=10{30} needs [\d.e+]+ PiB of decode cache for 2 "
                            r"sequence\(s\), but cpu has .* free: at most \d+ new tokens fit; "
                            r"lower max_new_tokens or the batch"),
    "temperature-string": (dict(temperature="0.5"), TypeError,
                           r"temperature='0.5' is a str: give a number >= 0 \(0 is greedy\)"),
    "temperature-nan": (dict(temperature=float("nan")), ValueError,
                        r"temperature=nan must be finite and >= 0"),
    "temperature-inf": (dict(temperature=float("inf")), ValueError,
                        r"temperature=inf must be finite and >= 0"),
    "temperature-negative": (dict(temperature=-1.0), ValueError, r"temperature=-1.0 must be"),
    "top-k-zero": (dict(top_k=0), ValueError, r"top_k=0 must be >= 1 \(or None for no top-k\)"),
    "top-k-fraction": (dict(top_k=2.5), TypeError, r"top_k=2.5 is a float"),
    "top-p-above-one": (dict(top_p=1.5), ValueError, r"top_p=1.5 must be in \(0, 1\]"),
    "top-p-nan": (dict(top_p=float("nan")), ValueError, r"top_p=nan must be in \(0, 1\]"),
    "seed-2-to-70": (dict(seed=2**70), ValueError,
                     r"seed=1180591620717411303424 is out of range: give a seed in \[0, 2\*\*64 - 1\]"),
    "seed-negative": (dict(seed=-1), ValueError, r"seed=-1 is out of range"),
    "seed-float": (dict(seed=1.5), TypeError, r"seed=1.5 is a float: give a whole number"),
    "stop-tokens-one-int": (dict(stop_tokens=5), TypeError,
                            r"stop_tokens=5 is one int: give a list of token ids, e.g. \[5\]"),
    "stop-tokens-strings": (dict(stop_tokens=["</s>"]), TypeError,
                            r"stop_tokens holds non-integer token ids \['</s>'\]"),
}


@pytest.fixture(scope="module")
def model(small_model_dir):
    return load(small_model_dir)


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_refuses_bad_input(case, model):
    overrides, error, pattern = GENERATE_CASES[case]
    kwargs = dict(dict(prompts=PROMPTS, max_new_tokens=3), **overrides)
    with pytest.raises(error) as info:
        generate(model, **kwargs)
    assert_one_line(info.value, pattern.replace("10{30}", str(10**30)))


@pytest.mark.parametrize(
    "prompts",
    [
        (p for p in PROMPTS),  # a generator, consumed once
        tuple(tuple(p) for p in PROMPTS),
        [torch.tensor(p) for p in PROMPTS],
        torch.tensor([[1, 2, 3]]),  # a 2-D tensor is a batch
    ],
    ids=["generator", "tuples", "1-d-tensors", "2-d-tensor"],
)
def test_generate_takes_other_prompt_containers(prompts, model):
    want = generate(model, PROMPTS, 4).tokens
    got = generate(model, prompts, 4).tokens
    assert got == want[: len(got)]


def test_max_new_tokens_is_bounded_by_free_memory(model, monkeypatch):
    """The bound is the largest count whose caches fit: it fits, one more does not."""
    free = 16 << 10  # a few chunks of this small model's cache
    monkeypatch.setattr("rat_plugin.generate.memory.free_bytes", lambda device: free)
    with pytest.raises(ValueError) as info:
        generate(model, PROMPTS, max_new_tokens=10**9)
    fit = int(re.search(r"at most (\d+) new tokens fit", str(info.value)).group(1))

    def need(new_tokens):  # both sequences' caches hold the longest prompt plus the new tokens
        return 2 * cache_bytes(model.args, 3 + new_tokens - 1, torch.float32)

    assert need(fit) <= free < need(fit + 1)
    generate(model, PROMPTS, max_new_tokens=fit)
    with pytest.raises(ValueError, match=f"max_new_tokens={fit + 1} needs"):
        generate(model, PROMPTS, max_new_tokens=fit + 1)

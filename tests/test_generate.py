"""Standalone generation: cached decoding against full recomputation, cache sizes against the
docs/design.md section 3 formula, sampling options, loading, the CLI and its errors."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from rat_plugin.convert import ModelSpec, dcp_to_standalone
from rat_plugin.generate import ModelFolderError, cache_bytes, generate, load
from rat_plugin.generate.__main__ import main as generate_main
from rat_plugin.model import RATModel, make_args

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
WINDOW = 8  # small SWA window so the ring buffer wraps within the test
# The debugmodel flavor made smaller (2 layers: RAT, then SWA for rat_swa) to keep CPU time low;
# chunk size stays L=16, the training length is 64.
SMALL = dict(dim=64, n_layers=2, ffn_hidden_dim=128, vocab_size=1024, max_seq_len=64)


def small_args(kind: str, **overrides):
    fields = dict(SMALL, **({"swa_window": WINDOW} if kind.endswith("swa") else {}))
    return make_args(kind, "debugmodel", **dict(fields, **overrides))


def build(kind: str, seed: int = 0, **overrides) -> RATModel:
    torch.manual_seed(seed)
    model = RATModel(small_args(kind, **overrides))
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
def test_cached_generation_equals_full_recomputation(kind):
    """One batch with prompt lengths 1, L-1, L, L+1, 3L+5 and 2x the training length: every
    step's logits equal a full forward over the whole prefix, so greedy continuations agree."""
    model = build(kind)
    L, train_len = model.args.chunk_size, model.args.max_seq_len
    lengths = [1, L - 1, L, L + 1, 3 * L + 5, 2 * train_len]
    gen = torch.Generator().manual_seed(1)
    vocab = model.args.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    new = L + 2  # every sequence closes a chunk while decoding, and the SWA ring wraps
    result = generate(model, prompts, max_new_tokens=new, return_logits=True)

    with torch.no_grad():
        for prompt, tokens, logits in zip(prompts, result.tokens, result.logits):
            assert len(tokens) == new and logits.shape == (new, model.args.vocab_size)
            for step in range(new):
                prefix = torch.tensor([prompt + tokens[:step]])
                full = model(prefix)[0, -1]  # recomputed from scratch, no cache
                torch.testing.assert_close(logits[step], full, atol=1e-5, rtol=0)
                assert tokens[step] == int(full.argmax()), "greedy continuation diverged"


@pytest.mark.parametrize("kind", ["rat", "rat_swa", "rat_attn"])
def test_bf16_cached_generation_tracks_bf16_recomputation(kind):
    """The dtype GPUs decode in: cached bf16 logits stay within a few bf16 ulps of a bf16 full
    forward (measured: 1 ulp, 0.0039; bf16 and fp32 full forwards differ by about as much)."""
    model = build(kind).to(torch.bfloat16)
    L = model.args.chunk_size
    prompts = [[3, 4, 5], list(range(7, 7 + L + 4)), [9] * (3 * L)]
    result = generate(model, prompts, max_new_tokens=L + 2, return_logits=True)
    with torch.no_grad():
        for prompt, tokens, logits in zip(prompts, result.tokens, result.logits):
            for step in range(len(tokens)):
                full = model(torch.tensor([prompt + tokens[:step]]))[0, -1].float()
                torch.testing.assert_close(logits[step], full, atol=1.6e-2, rtol=0)


def expected_layer_bytes(kind_of_layer: str, P: int, H: int, d: int, L: int, W: int, itemsize: int):
    """docs/design.md section 3 in our slot layout (the current chunk's rotated state takes a slot),
    written out independently of rat_plugin.generate.memory."""
    if kind_of_layer == "rat":
        return 2 * H * d * -(-P // L) * itemsize + 2 * H * d * 4
    if kind_of_layer == "attention":
        return 2 * H * d * P * itemsize
    return 2 * H * d * min(P, W + 1) * itemsize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rat", "rat_swa", "rat_attn", "rat_attn_swa"])
def test_cache_bytes_per_sequence_match_formula(kind, dtype):
    """After prefill and after decode steps, each layer's cache reports the formula's bytes."""
    model = build(kind).to(dtype)
    args = model.args
    H, d, L = args.n_heads, args.head_dim, args.chunk_size

    def check(caches, P):
        want = [
            expected_layer_bytes(args.layer_mixer(i), P, H, d, L, WINDOW, dtype.itemsize)
            for i in range(args.n_layers)
        ]
        assert [c.nbytes_per_sequence() for c in caches] == want, (P, kind)
        assert cache_bytes(args, P, dtype) == sum(want)

    with torch.no_grad():
        for prompt_len in (1, L - 1, L, L + 1, 3 * L + 5):  # after prefill
            caches = model.new_caches(torch.tensor([prompt_len]), max_len=prompt_len)
            model(torch.randint(0, args.vocab_size, (1, prompt_len)), caches=caches)
            check(caches, prompt_len)
        caches = model.new_caches(torch.tensor([1]), max_len=2 * L + 2)
        model(torch.randint(0, args.vocab_size, (1, 1)), caches=caches)
        for P in range(2, 2 * L + 3):  # decoding across two chunk ends and the window
            model(torch.randint(0, args.vocab_size, (1, 1)), caches=caches)
            check(caches, P)


def test_generate_reports_cache_bytes_and_speed():
    model = build("rat")
    result = generate(model, [[1, 2, 3], [4] * 40], max_new_tokens=5)
    assert result.stats.cache_bytes_per_sequence == cache_bytes(model.args, 40 + 4, torch.float32)
    assert result.stats.new_tokens == 10 and result.stats.prompt_tokens == 43
    assert result.stats.tokens_per_s > 0


def test_rat_cache_is_about_chunk_size_times_smaller_at_1p3b():
    rat, attn = make_args("rat", "1.3B"), make_args("rat_attn", "1.3B")
    P = rat.max_seq_len
    ratio = cache_bytes(attn, P, torch.bfloat16) / cache_bytes(rat, P, torch.bfloat16)
    assert 0.9 * rat.chunk_size < ratio <= rat.chunk_size * 1.01


def test_sampling_options():
    model = build("rat_swa")
    prompts = [[5, 6, 7], [9] * 20]
    greedy = generate(model, prompts, 12).tokens
    # top-k 1 and a tiny top-p keep only the most likely token: greedy.
    assert generate(model, prompts, 12, temperature=1.0, top_k=1, seed=0).tokens == greedy
    assert generate(model, prompts, 12, temperature=1.0, top_p=1e-6, seed=0).tokens == greedy
    a = generate(model, prompts, 12, temperature=1.5, top_k=50, top_p=0.9, seed=7).tokens
    b = generate(model, prompts, 12, temperature=1.5, top_k=50, top_p=0.9, seed=7).tokens
    c = generate(model, prompts, 12, temperature=1.5, top_k=50, top_p=0.9, seed=8).tokens
    assert a == b and a != c
    # top-k restricts the support: every sampled token is among the k most likely.
    result = generate(model, prompts, 12, temperature=5.0, top_k=3, seed=1, return_logits=True)
    for tokens, logits in zip(result.tokens, result.logits):
        top3 = logits.topk(3, dim=-1).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(tokens))


def test_stop_tokens_end_each_sequence_independently():
    model = build("rat")
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, 10).tokens
    stop = free[0][3]
    stopped = generate(model, prompts, 10, stop_tokens=[stop]).tokens
    first = free[0].index(stop)
    assert stopped[0] == free[0][: first + 1]
    assert stopped[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_bf16_generation_runs_and_tracks_fp32():
    model = build("rat_swa")
    prompts = [[1, 2, 3, 4], [7] * 33]
    fp32 = generate(model, prompts, 6, return_logits=True)
    bf16 = generate(model.to(torch.bfloat16), prompts, 6, return_logits=True)
    assert all(len(t) == 6 for t in bf16.tokens)
    # Same first-token logits up to bf16 rounding (later steps may follow other tokens).
    for a, b in zip(fp32.logits, bf16.logits):
        torch.testing.assert_close(b[0], a[0], atol=0.05, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generation_matches_cpu():
    model = build("rat_swa")
    prompts = [[1, 2, 3, 4], [7] * 40]
    cpu = generate(model, prompts, 8, return_logits=True)
    gpu = generate(model.cuda(), prompts, 8, return_logits=True)
    assert gpu.tokens == cpu.tokens
    for a, b in zip(cpu.logits, gpu.logits):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[]], "prompt 0 is empty"),
        ([[1, 2], [3, 1024]], r"prompt 1 has token ids outside the vocabulary \[0, 1024\)"),
        ([[-1]], "outside the vocabulary"),
        ([], "non-empty list"),
    ],
)
def test_bad_prompts_are_clear_errors(prompts, match):
    with pytest.raises(ValueError, match=match):
        generate(build("rat"), prompts, 4)


def test_bad_sampling_arguments_are_clear_errors():
    model = build("rat")
    for kwargs, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ]:
        kwargs.setdefault("max_new_tokens", 3)
        with pytest.raises(ValueError, match=match):
            generate(model, [[1]], **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted rat_swa debug model folder (via a single-process DCP save), with tokenizer."""
    root = tmp_path_factory.mktemp("gen")
    model = build("rat_swa")
    dcp.save(model.state_dict(), checkpoint_id=str(root / "step-1"), no_dist=True)
    spec = ModelSpec("rat_swa", "debugmodel", model.args, "test")
    dcp_to_standalone(root / "step-1", root / "model", spec, tokenizer_dir=TOKENIZER, log=print)
    return root / "model", model


def test_load_gives_the_same_model(model_dir):
    folder, original = model_dir
    loaded = load(folder)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), original(tokens), atol=0, rtol=0)
    assert load(folder, dtype="bf16").tok_embeddings.weight.dtype == torch.bfloat16


def test_load_errors(tmp_path, model_dir):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match="no config.json"):
        load(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir[0], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError, match="cannot read"):
        load(broken)


def test_cli_streams_the_greedy_continuation(model_dir, capsys):
    folder, original = model_dir
    argv = ["--model", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "7"]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    want = generate(original, [[1, 2, 3]], 7).tokens[0]
    assert out.splitlines()[0].split() == [str(t) for t in [1, 2, 3, *want]]
    assert "tokens/s" in out and "KiB per sequence" in out


def test_cli_text_prompts_use_the_copied_tokenizer(model_dir, tmp_path, capsys):
    folder, _ = model_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe cat\n")
    assert generate_main(["--model", str(folder), "--prompts-file", str(prompts),
                          "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[0] Once upon a time") and "\n[1] The cat" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt-ids", "1 99999"], "outside the vocabulary"),
        (["--prompt-ids", " "], "prompt 0 is empty"),
        (["--prompt", ""], "is empty"),
    ],
)
def test_cli_errors_are_one_line(model_dir, capsys, argv, match):
    assert generate_main(["--model", str(model_dir[0]), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_cli_missing_model_and_tokenizer(model_dir, tmp_path, capsys):
    assert generate_main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(model_dir[0], bare)
    (bare / "tokenizer.json").unlink()
    assert generate_main(["--model", str(bare), "--prompt", "hi"]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err


def test_cache_memory_tool_prints_the_1p3b_figures(monkeypatch, capsys):
    import runpy

    tool = Path(__file__).resolve().parents[1] / "tools" / "cache_memory.py"
    monkeypatch.setattr("sys.argv", [str(tool), "--positions", "4096"])
    runpy.run_path(str(tool), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1.3B: 24 layers, H=16, d=128, L=16")
    row = out[2].split()
    # rat 48.4 MiB (24 * (2*16*128*256*2 + 2*16*128*4) bytes), attention 768 MiB: ratio ~L.
    assert row[:3] == ["4096", "48.4", "MiB"] and row[5:7] == ["768.0", "MiB"]
    assert float(row[-1]) == pytest.approx(15.9, abs=0.05)

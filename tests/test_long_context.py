"""Long-context evaluation: loss by position through the decode cache
(``rat_plugin/eval/scoring.py``, ``perplexity.py``, tools/perplexity_by_position.py) and passkey
retrieval (``rat_plugin/eval/retrieval.py``, tools/retrieval.py).

The scoring is checked on crafted inputs with known answers (a model whose logits are set by
hand, an answerer that only sees part of the prompts) and against a plain full forward; the tools
run on a tiny exported model at small lengths and write their JSON and PNG."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_main
from rat_plugin.eval import retrieval
from rat_plugin.eval.perplexity import by_position, token_windows
from rat_plugin.eval.scoring import position_losses
from rat_plugin.generate import load, load_tokenizer
from rat_plugin.model import RATModel, make_args

sys.path.insert(0, str(REPO / "tools"))
import _eval_common  # noqa: E402
import perplexity_by_position as ppl_tool  # noqa: E402
import retrieval as retrieval_tool  # noqa: E402

VOCAB, MARGIN = 64, 4.0


class Successor(RATModel):
    """Logits MARGIN on token + 1 and 0 elsewhere, whatever the weights (the caches still
    advance as the real model's): the loss is log(1 + (V-1) e^-M) where the next token is the
    successor, and M more where it is not."""

    def forward(self, tokens, positions=None, caches=None, logits_at=None):
        super().forward(tokens, positions, caches, logits_at)
        return MARGIN * F.one_hot((tokens + 1) % VOCAB, VOCAB).float()


def tiny(kind: str = "rat", cls=RATModel) -> RATModel:
    torch.manual_seed(0)
    model = cls(make_args(kind, "debugmodel", dim=64, n_layers=2, ffn_hidden_dim=128,
                          vocab_size=VOCAB))
    model.init_weights()
    return model.eval()


def test_position_losses_of_known_logits():
    windows = torch.arange(40).repeat(2, 1) % VOCAB
    windows[0, 5] = windows[1, 30] = 50  # a wrong successor once in the prefill, once decoded
    losses = position_losses(tiny(cls=Successor), windows, prefill=16)
    hit = math.log(1 + (VOCAB - 1) * math.exp(-MARGIN))
    want = torch.full((2, 39), hit, dtype=torch.float64)
    # Token 50 at position 5 (30) is not the successor of position 4 (29), and position 6 (31)
    # is not the successor of 50: column t scores token t + 1.
    for row, position in ((0, 5), (1, 30)):
        want[row, position - 1] = want[row, position] = hit + MARGIN
    torch.testing.assert_close(losses.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["rat", "rat_swa"])
@pytest.mark.parametrize("prefill", [7, 39])
def test_cached_position_losses_equal_a_full_forward(kind, prefill):
    model = tiny(kind)
    torch.manual_seed(1)
    windows = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    want = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    torch.testing.assert_close(position_losses(model, windows, prefill), want,
                               atol=1e-5, rtol=1e-5)


def test_losses_by_position_and_bucket():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0, 7.0]])
    result = by_position(losses, bucket=2)
    assert result["loss_by_position"] == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert result["positions"] == [1, 3, 5]
    assert result["loss"] == [2.5, 4.5, 6.0]
    assert result["perplexity"] == pytest.approx([math.exp(v) for v in (2.5, 4.5, 6.0)])


def test_token_windows():
    tokens = list(range(10, 30))
    assert token_windows(tokens, 6, 5, bos=1).tolist() == [
        [1, 10, 11, 12, 13, 14], [1, 15, 16, 17, 18, 19], [1, 20, 21, 22, 23, 24],
        [1, 25, 26, 27, 28, 29]]
    assert token_windows(tokens, 6, 2, bos=None).tolist() == [list(range(10, 16)),
                                                               list(range(16, 22))]
    with pytest.raises(ValueError, match="the text has 20 tokens, fewer than one window of 30: "
                       "give a longer text or a smaller --length"):
        token_windows(tokens, 31, 1, bos=1)


# ---- retrieval ------------------------------------------------------------------------------

def word_builder(haystack=None) -> retrieval.PromptBuilder:
    """Prompts over a word-level 'tokenizer' (one id per word), so positions are countable."""
    vocab: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        return [vocab.setdefault(word, len(vocab) + 2) for word in text.split()]

    builder = retrieval.PromptBuilder(encode, 1, haystack)
    builder.words = lambda tokens: [{i: w for w, i in vocab.items()}[t] for t in tokens]
    return builder


@pytest.mark.parametrize("depth", [0, 0.25, 0.5, 0.75, 1])
def test_the_needle_sits_at_its_depth_in_a_prompt_of_its_length(depth):
    builder = word_builder()
    prompt = builder.build(400, depth, "12345")
    words = builder.words(prompt.tokens[1:])
    assert prompt.tokens[0] == 1 and len(prompt.tokens) <= 400
    assert len(prompt.tokens) > 400 - 6  # the longest filler sentence is 4 words
    assert " ".join(words[-len(retrieval.QUESTION.split()):]) == retrieval.QUESTION
    needle = retrieval.NEEDLE.format(key="12345").split()
    assert words[prompt.needle_at - 1: prompt.needle_at - 1 + len(needle)] == needle
    start, end = prompt.haystack
    haystack = end - start - len(needle)
    assert abs((prompt.needle_at - start) - depth * haystack) <= 4  # one sentence at most


def test_haystack_from_a_text_and_too_short_lengths():
    text = "First one here. Second sentence! A third? And a fourth."
    assert retrieval.sentences(text) == ["First one here.", "Second sentence!", "A third?",
                                         "And a fourth."]
    builder = word_builder(retrieval.sentences(text))
    prompt = builder.build(200, 0.5, "54321")
    words = " ".join(builder.words(prompt.tokens[1:]))
    assert "Second sentence! A third?" in words and "54321 is the pass key." in words
    with pytest.raises(ValueError, match=r"length 40 leaves no room for a haystack sentence: "
                       rf"use lengths of at least {builder.minimum_length()} tokens"):
        builder.build(40, 0.5, "54321")
    with pytest.raises(ValueError, match="the haystack text has no sentence"):
        word_builder(retrieval.sentences("   "))  # not silently the passkey filler


@pytest.mark.parametrize("answer,right", [
    (" 71432.", True), ("71432 is the pass key", True), ("the key: 71432", True),
    (" 7143", False), (" 714321", False), ("", False), (" 1 71432", False),
])
def test_an_answer_is_right_when_its_first_number_is_the_key(answer, right):
    assert retrieval.is_correct(answer, "71432") is right


def test_accuracy_per_length_and_depth_of_a_known_answerer():
    """An answerer that finds the key only in the first half of prompts of at most 300 tokens
    (and says 99999 otherwise): accuracy 1 there, 0 elsewhere."""
    builder = word_builder()
    calls = []

    def answer(prompts):
        calls.append(len(prompts))
        out = []
        for tokens in prompts:
            words = builder.words(tokens[1:])
            at = words.index("pass")  # "The pass key is KEY."
            seen = len(tokens) <= 300 and at < len(words) / 2
            out.append(f" {words[at + 3].rstrip('.')}." if seen else " 99999.")
        return out

    cells = retrieval.run(builder, answer, [200, 400], [0, 0.25, 0.75, 1], trials=3, seed=7,
                          batch_size=5)
    assert calls == [5, 5, 2, 5, 5, 2]  # 12 prompts per length in batches of 5
    table = {(c.length, c.depth): (c.correct, c.trials) for c in cells}
    assert table == {(200, 0): (3, 3), (200, 0.25): (3, 3), (200, 0.75): (0, 3),
                     (200, 1): (0, 3), (400, 0): (0, 3), (400, 0.25): (0, 3),
                     (400, 0.75): (0, 3), (400, 1): (0, 3)}
    # Each cell keeps what was asked and answered, so a 0% can be told from a near miss.
    for cell in cells:
        seen = cell.length <= 300 and cell.depth < 0.5
        assert len(cell.keys) == len(cell.answers) == 3
        assert cell.answers == ([f" {key}." for key in cell.keys] if seen else [" 99999."] * 3)


# ---- the plots ------------------------------------------------------------------------------

@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def assert_readable(fig, ax, train_length: int, legend: list[str]):
    """Everything drawn lies inside the figure once laid out as tools/_eval_common.write does
    (nothing clipped), the legend says what each mark is, and the training-length line lies
    within the x limits (or, where the legend has no line, a note at the edge names it)."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    drawn = fig.get_tightbbox(renderer)  # inches
    width, height = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, drawn
    assert drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, (drawn, width, height)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == legend
    if f"training length {train_length}" not in legend:
        [note] = [t for t in ax.texts if f"training length {train_length} " in t.get_text()]
        assert (note.xy, note.xycoords) == ((1, 0.5), "axes fraction")  # the right edge
        return
    [line] = [a for a in ax.get_lines() if a.get_label() == f"training length {train_length}"]
    low, high = ax.get_xlim()
    assert all(low < x < high for x in line.get_xdata()), (line.get_xdata(), low, high)


def retrieval_cells(lengths, depths, trials=4):
    return [retrieval.Cell(n, d, n, (i * 3) % (trials + 1), trials, ["12345"] * trials,
                           [" 12345."] * trials) for i, (n, d) in
            enumerate((n, d) for n in lengths for d in depths)]


@pytest.mark.parametrize("lengths,train_length", [
    ([1024, 2048, 4096, 8192], 4096),  # the default: 1K doubling to twice the training length
    ([256, 384], 64),                  # every tested length beyond the training length
    ([32, 48], 64),                    # every tested length within it
])
def test_retrieval_plot_marks_the_training_length_and_the_counts(plt, lengths, train_length):
    depths = [0, 0.5, 1]
    cells = retrieval_cells(lengths, depths)
    fig = retrieval_tool.plot(cells, train_length, "a title")(plt)
    ax = fig.axes[0]
    assert_readable(fig, ax, train_length, [f"training length {train_length}"])
    # Each cell shows its count of right answers: the colour alone hides how many trials.
    counts = sorted(t.get_text() for t in ax.texts if "/" in t.get_text())
    assert counts == sorted(f"{c.correct}/{c.trials}" for c in cells)
    assert ax.get_title() == "a title"


@pytest.mark.parametrize("windows,length,train_length,line", [
    (3, 2049, 512, True),  # 4x the training length, as by default
    (2, 129, 150, True),   # just beyond the last position: drawn where it is
    (1, 129, 512, False),  # far beyond it: a note at the edge, not a curve squeezed to the left
])
def test_perplexity_plot_shows_the_spread_across_windows_from_zero(plt, windows, length,
                                                                    train_length, line):
    """Window losses about 5 nats with a spread of 0.1: the y axis starts at 0 (a wiggle of
    0.1 nats reads as what it is), the band spans the windows' bucket means, the training
    length is marked wherever it lies."""
    torch.manual_seed(0)
    losses = 5 + 0.1 * torch.randn(windows, length - 1)
    result = by_position(losses, bucket=64)
    per_window = torch.stack([losses[:, start: start + 64].double().mean(1)
                              for start in range(0, length - 1, 64)], dim=1)
    torch.testing.assert_close(torch.tensor(result["loss_by_window"], dtype=torch.float64),
                               per_window)
    fig = ppl_tool.plot(result, train_length, "a title")(plt)
    ax = fig.axes[0]
    spread = ([f"range over the {windows} windows"] if windows > 1 else [])
    mean = f"mean of {windows} window{'s' if windows > 1 else ''}, buckets of 64 positions"
    marker = [f"training length {train_length}"] if line else []
    assert_readable(fig, ax, train_length, [mean, *spread, *marker])
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] < 2 * 5.5
    bands = [c for c in ax.collections if c.get_label() == spread[0]] if spread else []
    if windows > 1:
        [band] = bands
        y = band.get_paths()[0].vertices[:, 1]
        assert (y.min(), y.max()) == pytest.approx((per_window.min(), per_window.max()))


# ---- the tools on an exported model ---------------------------------------------------------

@pytest.fixture(scope="module")
def text_file(tmp_path_factory, debug_assets):
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    lines = (debug_assets / "data" / "rat_debug" / "validation.jsonl").read_text().splitlines()
    path.write_text("\n".join(json.loads(line)["text"] for line in lines[:60]))
    return path


@pytest.fixture
def figures(monkeypatch):
    """The figures the tools draw (as written to their PNG), in order."""
    drawn = []
    write = _eval_common.write

    def keep(args, name, payload, draw):
        write(args, name, payload, lambda plt: drawn.append(draw(plt)) or drawn[-1])

    monkeypatch.setattr(_eval_common, "write", keep)
    return drawn


def test_perplexity_tool_writes_json_and_png(small_model_dir, text_file, tmp_path, capsys,
                                             figures):
    out = tmp_path / "ppl"
    code, stdout, err = run_main(ppl_tool.main, [
        "--model", str(small_model_dir), "--text", str(text_file), "--out", str(out),
        "--windows", "2", "--bucket", "16", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads((out / "perplexity_by_position.json").read_text())
    assert (out / "perplexity_by_position.png").stat().st_size > 0
    # Defaults: 4x the training length (64), prefilled up to the training length.
    assert (result["length"], result["prefill"], result["windows"]) == (256, 64, 2)
    assert len(result["loss_by_position"]) == 255 and result["positions"][:2] == [1, 17]
    assert result["mean_loss"] == pytest.approx(sum(result["loss_by_position"]) / 255)
    # Training windows of 64 tokens predicted tokens 1..64: the first 64 positions.
    by_position = result["loss_by_position"]
    assert result["mean_loss_within_train_length"] == pytest.approx(sum(by_position[:64]) / 64)
    assert result["mean_loss_beyond_train_length"] == pytest.approx(sum(by_position[64:]) / 191)

    model, tokenizer = load(small_model_dir), load_tokenizer(small_model_dir)
    windows = token_windows(tokenizer.encode(text_file.read_text()).ids, 256, 2, bos=0)
    with torch.no_grad():
        logits = model(windows[:, :-1])
    want = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    assert result["loss_by_position"] == pytest.approx(want.tolist(), abs=1e-5)
    assert result["bucket"] == 16 and len(result["loss_by_window"]) == 2
    # The plot says what it averages: model, text, windows, bucket size.
    [fig] = figures
    assert fig.axes[0].get_title() == (
        f"loss by position: model on {text_file.name}\n"
        "2 windows of 256 tokens, buckets of 16 positions, prefill 64")


def test_retrieval_tool_writes_json_and_png(small_model_dir, tmp_path, capsys, figures):
    out = tmp_path / "retrieval"
    args = ["--model", str(small_model_dir), "--out", str(out), "--lengths", "256", "384",
            "--depths", "0", "1", "--trials", "2", "--device", "cpu"]
    code, stdout, err = run_main(retrieval_tool.main, args, capsys)
    assert code == 0, err
    result = json.loads((out / "retrieval.json").read_text())
    assert (out / "retrieval.png").stat().st_size > 0
    assert (result["lengths"], result["depths"], result["trials"]) == ([256, 384], [0, 1], 2)
    assert len(result["cells"]) == 4 and all(c["trials"] == 2 for c in result["cells"])
    assert all(c["prompt_tokens"] <= c["length"] for c in result["cells"])
    assert [[c["accuracy"] for c in result["cells"] if c["length"] == n]
            for n in (256, 384)] == result["accuracy"]
    # What was asked and answered, per trial: the count is re-scored from it.
    for cell in result["cells"]:
        assert len(cell["keys"]) == len(cell["answers"]) == 2
        assert all(isinstance(a, str) and len(k) == 5 for k, a in zip(cell["keys"],
                                                                       cell["answers"]))
        assert cell["correct"] == sum(map(retrieval.is_correct, cell["answers"], cell["keys"]))
    [fig] = figures
    assert fig.axes[0].get_title() == (
        "pass key retrieval: model, 2 keys per cell, passkey filler")

    # Again into the same folder: only with --force; never into the model folder.
    code, _, err = run_main(retrieval_tool.main, args, capsys)
    assert (code, err) == (1, f"error: {out} already exists: pass --force to replace it\n")
    assert run_main(retrieval_tool.main, args + ["--force"], capsys)[0] == 0
    inside = ["--out", str(small_model_dir / "results")]
    code, _, err = run_main(retrieval_tool.main, args + inside + ["--force"], capsys)
    assert code == 1 and "is inside the model folder" in err and err.count("\n") == 1


def test_without_matplotlib_the_tools_write_json_only(small_model_dir, text_file, tmp_path,
                                                      capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "ppl"
    code, stdout, err = run_main(ppl_tool.main, [
        "--model", str(small_model_dir), "--text", str(text_file), "--out", str(out),
        "--length", "96", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "matplotlib is not installed: no PNG plot (pip install 'rat-titan[bench]')" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["perplexity_by_position.json"]


@pytest.mark.parametrize("tool,args,error", [
    (ppl_tool, ["--text", "/nonexistent.txt"], "argument --text: /nonexistent.txt is not a file"),
    (ppl_tool, ["--text", "x", "--length", "8", "--prefill", "8"],
     "argument --prefill: 8 must be below --length 8"),
    (retrieval_tool, ["--depths", "1.5"], r"argument --depths: [1.5] must lie in [0, 1]"),
])
def test_bad_flags_are_one_line_before_the_model_loads(tool, args, error, capsys):
    code, _, err = run_main(tool.main, ["--model", "/nonexistent", *args], capsys)
    assert code == 2 and err == f"error: {error}\n"

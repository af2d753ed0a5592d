"""Scoring by generation: RULER's needle samples (rat_plugin/eval/ruler.py), the test-time prompt
budget of generate_until (``rat`` and ``hf_middle``: max_length - max_gen_toks, cut in the
middle), and tools/score_generation.py on a tiny model and its --to-hf export: both routes give
the same generations and scores, the rat route the plain greedy continuation of the cut prompt.

The tool runs on a small model whose weights are scaled up from the init: at the init the tied
head mostly repeats the prompt's last token, which a cut that keeps the end cannot change."""

import json
import random
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, run_main
from rat_plugin.convert import ModelSpec, write_folder
from rat_plugin.eval import longbench, ruler
from rat_plugin.generate import load, load_tokenizer
from rat_plugin.generate.loading import special_token_ids

sys.path.insert(0, str(REPO / "tools"))
import score_generation  # noqa: E402

STORY = ("Anna walked to the old bridge in the morning. The weather was sunny and warm. "
         "She saw a red ball near the river. Then Oscar came with a big drum. ")


def haystack_words() -> list[str]:
    lines = (REPO / "assets" / "data" / "rat_debug" / "validation.jsonl").read_text()
    return " ".join(json.loads(line)["text"] for line in lines.splitlines()[:40]).split()


@pytest.fixture(scope="module")
def encode():
    tokenizer = load_tokenizer(REPO / "assets" / "tokenizer")
    bos, _ = special_token_ids(REPO / "assets" / "tokenizer", tokenizer)
    return lambda text: [bos] + tokenizer.encode(text, add_special_tokens=False).ids


# ---- RULER's needle samples --------------------------------------------------------------

@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_ruler_samples_hide_every_answer_and_fill_the_length(task, encode):
    needles = ruler.TASKS[task]
    generator = ruler.Generator(needles, encode, haystack_words(), tokens_to_generate=16)
    samples = generator.samples(1024, 3, seed=1)
    assert [s["index"] for s in samples] == [0, 1, 2]
    for sample in samples:
        tokens = len(encode(sample["input"] + " " + sample["gen_prefix"]))  # lm_eval's prompt
        assert sample["length"] == tokens + 16 <= 1024
        assert tokens + 16 > 0.9 * 1024  # as much haystack as fits
        assert sample["max_length"] == 1024
        values = sample["outputs"]
        assert len(values) == needles.num_v * needles.num_q
        for value in values:  # each asked value is stated once, by its needle
            assert len(re.findall(rf"for [\w-]+ is: {re.escape(value)}\.", sample["input"])) == 1
        question = sample["input"].splitlines()[-1]
        keys = re.findall(r"for ([\w-]+) is: (\S+)\.", sample["input"])
        asked = {k for k, v in keys if v.rstrip(".") in values}
        assert all(k in question and k in sample["gen_prefix"] for k in asked)
        single = needles.num_v * needles.num_q == 1
        assert sample["input"].startswith("A special magic" if single else "Some special magic")
        assert sample["gen_prefix"].endswith(" is" if single else " are")
    assert generator.samples(1024, 3, seed=1) == samples  # reproducible


def test_ruler_depths_spread_the_needles(encode):
    generator = ruler.Generator(ruler.TASKS["niah_single_2"], encode, haystack_words(), 16)
    where = []
    for sample in generator.samples(1024, 12, seed=0):
        text = sample["input"]
        where.append(text.index("One of the special magic") / len(text))
    assert min(where) < 0.3 and max(where) > 0.7


def test_ruler_refuses_a_length_without_room(encode):
    generator = ruler.Generator(ruler.TASKS["niah_single_1"], encode, (), 16)
    with pytest.raises(ValueError, match="length 128 holds no prompt of this task with 16 tokens"):
        generator.samples(128, 1)


# ---- the prompt budget of generate_until ---------------------------------------------------

@torch.no_grad()
def greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """The plain greedy continuation: a full forward per token, no cache."""
    new = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
    return new


def test_a_long_prompt_is_cut_in_the_middle_to_the_budget(small_model_dir, monkeypatch):
    import rat_plugin.eval.harness as harness

    lm = harness.RATHarnessModel(pretrained=str(small_model_dir), max_length=48)
    tokenizer = load_tokenizer(small_model_dir)
    bos, eos = special_token_ids(small_model_dir, tokenizer)
    text = STORY * 2
    ids = [bos] + tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 2 * 40  # more than twice the budget
    budget = 48 - 8  # max_length - max_gen_toks
    want = ids[:20] + ids[-20:]  # the first and last halves of the budget
    seen = []
    real = harness.generate
    monkeypatch.setattr(harness, "generate",
                        lambda model, prompts, *a, **k: seen.append(prompts) or real(
                            model, prompts, *a, **k))
    short = "Anna saw"
    options = {"max_gen_toks": 8, "until": []}
    got, _ = lm.generate_until([SimpleNamespace(args=(t, options)) for t in (text, short)])
    assert seen == [[want], [[bos] + tokenizer.encode(short, add_special_tokens=False).ids]]
    assert len(want) == budget
    model = load(small_model_dir)
    assert got == tokenizer.decode(greedy(model, want, 8, eos))
    with pytest.raises(ValueError, match=r"^max_gen_toks=48 leaves no room for a prompt within "
                                         r"max_length=48: raise max_length \(model_args\)"):
        lm.generate_until([SimpleNamespace(args=(short, {"max_gen_toks": 48}))])
    with pytest.raises(ValueError, match=r"max_length=0: give a whole number of tokens >= 1"):
        harness.RATHarnessModel(pretrained=str(small_model_dir), max_length=0)


def export(folder, root):
    from rat_plugin.hf.export import folder_to_hf

    folder_to_hf(folder, root / "hf", log=lambda _: None)
    return root / "hf"


@pytest.fixture(scope="module")
def hf_dir(small_model_dir, tmp_path_factory):
    return export(small_model_dir, tmp_path_factory.mktemp("score_hf"))


@pytest.fixture(scope="module")
def lively_dir(small_model_dir, tmp_path_factory, debug_assets):
    """The small model with its matrices scaled up: greedy answers that depend on the prompt."""
    root = tmp_path_factory.mktemp("score_lively")
    model = load(small_model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embeddings" not in name:
                weight.mul_(16)
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    write_folder(state, ModelSpec("rat", "debugmodel", model.args, "test"), root / "model",
                 tokenizer_dir=debug_assets / "tokenizer", log=lambda _: None)
    return root / "model"


def test_hf_middle_encodes_the_same_cut_prompts_left_padded(small_model_dir, hf_dir):
    import rat_plugin.eval.harness as harness

    rat = harness.RATHarnessModel(pretrained=str(small_model_dir))
    hf = harness.MiddleCutHFLM(pretrained=str(hf_dir), dtype="float32", device="cpu")
    assert hf.max_length == rat.max_length == 64  # the training length of both
    texts = [STORY * 2, STORY, "Anna saw"]
    ids, mask = hf.tok_batch_encode(texts, left_truncate_len=40)
    rows = [harness.middle_truncate(rat.tok_encode(t), 40) for t in texts]
    assert [len(r) for r in rows] == [40, 40, 5]  # BOS + 4 tokens
    assert ids.shape == mask.shape == (3, 40)
    for row, want, keep in zip(ids.tolist(), rows, mask.tolist()):
        assert row[40 - len(want):] == want and keep == [0] * (40 - len(want)) + [1] * len(want)


# ---- tools/score_generation.py -------------------------------------------------------------

def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """A LongBench folder (narrativeqa, qmsum) and a generated-QA folder in LongBench's record
    format, with contexts longer than the prompt budget, and a haystack text."""
    root = tmp_path_factory.mktemp("score_data")
    rng = random.Random(0)
    sentences = STORY.split(". ")

    def record(i, dataset, question, answers):
        context = ". ".join(rng.choice(sentences) for _ in range(70 + 10 * i))
        return {"input": question, "context": context, "answers": answers,
                "length": len(context.split()), "dataset": dataset, "language": "en",
                "all_classes": None, "_id": f"{dataset}-{i}"}

    write_jsonl(root / "longbench" / "narrativeqa.jsonl",
                [record(i, "narrativeqa", "What did Anna see?", ["a red ball", "ball"])
                 for i in range(3)])
    write_jsonl(root / "longbench" / "qmsum.jsonl",
                [record(i, "qmsum", "Summarize.", ["Anna saw a ball. Oscar came."])
                 for i in range(2)])
    write_jsonl(root / "longqa" / "test.jsonl",
                [record(i, "rat_longqa", "Who came with a drum?", ["Oscar"]) for i in range(3)])
    (root / "haystack.txt").write_text(" ".join(haystack_words()))
    return root


def score(folder, data, out, *extra) -> list[str]:
    return [
        "--model", str(folder), "--out", str(out), "--device", "cpu",
        "--tasks", "longbench_narrativeqa,longbench_qmsum,rat_longqa,niah_single_1,niah_single_2",
        "--longbench-dir", str(data / "longbench"), "--rat-longqa-dir", str(data / "longqa"),
        "--haystack", str(data / "haystack.txt"), "--ruler-lengths", "512",
        "--ruler-samples", "2", "--max-length", "512", "--max-gen-toks", "8",
        "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def routes(lively_dir, local_data, tmp_path_factory):
    """The tool's output folders for the standalone folder (rat) and its export (hf_middle)."""
    outs = {}
    hf = export(lively_dir, tmp_path_factory.mktemp("score_lively_hf"))
    for name, folder in (("rat", lively_dir), ("hf", hf)):
        out = tmp_path_factory.mktemp(f"score_{name}") / "scores"
        assert score_generation.main(score(folder, local_data, out)) == 0
        outs[name] = out
    return outs


def read_samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rat_and_hf_routes_generate_and_score_the_same(routes):
    rat, hf = (json.loads((routes[r] / "scores.json").read_text()) for r in ("rat", "hf"))
    assert (rat["lm_eval_model"], hf["lm_eval_model"]) == ("rat", "hf_middle")
    assert read_samples(routes["rat"]) == read_samples(routes["hf"])
    assert rat["tasks"] == hf["tasks"]
    assert set(rat["tasks"]) == {"longbench_narrativeqa", "longbench_qmsum", "rat_longqa",
                                 "niah_single_1", "niah_single_2"}


@pytest.mark.slow
def test_scores_are_the_scorers_on_the_generations(routes, local_data):
    report = json.loads((routes["rat"] / "scores.json").read_text())
    metric = {"longbench_narrativeqa": "qa_f1_score", "longbench_qmsum": "rouge_score",
              "rat_longqa": "qa_f1_score"}
    samples = read_samples(routes["rat"])
    for task, entry in report["tasks"].items():
        rows = [s for s in samples if s["task"] == task]
        assert entry["samples"] == len(rows) == (2 if task != "longbench_narrativeqa"
                                                 and task != "rat_longqa" else 3)
        for row in rows:
            if task in metric:
                want = longbench.best(metric[task], row["generation"].strip(), row["answers"])
            else:  # RULER: the share of the needles' values in the answer
                want = sum(v.lower() in row["generation"].strip().lower()
                           for v in row["answers"]) / len(row["answers"])
            assert row["scores"]["score"] == pytest.approx(want)
        mean = sum(r["scores"]["score"] for r in rows) / len(rows)
        assert entry["metrics"]["score"] == pytest.approx(mean)
        if task.startswith("niah"):
            assert entry["metrics"]["512"] == pytest.approx(mean)
    table = (routes["rat"] / "scores.md").read_text().splitlines()
    assert table[0] == "| task | samples | score | metrics |"
    row = next(line for line in table if line.startswith("| rat_longqa |"))
    qa = report["tasks"]["rat_longqa"]["metrics"]
    assert row == (f"| rat_longqa | 3 | {100 * qa['score']:.2f} | qa_f1_score "
                   f"{100 * qa['qa_f1_score']:.2f}, exact_match {100 * qa['exact_match']:.2f} |")


@pytest.mark.slow
def test_the_rat_route_answers_are_the_greedy_continuations_of_the_cut_prompts(
        routes, local_data, lively_dir):
    from rat_plugin.data.templates import render

    tokenizer = load_tokenizer(lively_dir)
    bos, eos = special_token_ids(lively_dir, tokenizer)
    model = load(lively_dir)
    records = [json.loads(line) for line in
               (local_data / "longqa" / "test.jsonl").read_text().splitlines()]
    generations = [s["generation"] for s in read_samples(routes["rat"])
                   if s["task"] == "rat_longqa"]

    def answer(prompt: list[int]) -> str:  # the task stops at a newline
        return tokenizer.decode(greedy(model, prompt, 8, eos)).split("\n")[0]

    left_cut = []
    for record, generation in zip(records, generations):
        ids = [bos] + tokenizer.encode(render("rat_longqa", record), add_special_tokens=False).ids
        assert len(ids) > 512 - 8  # cut: 252 first and 252 last tokens kept
        assert generation == answer(ids[:252] + ids[-252:])
        left_cut.append(answer(ids[-504:]))
    assert left_cut != generations  # the model answers differently when the start is lost


@pytest.mark.parametrize("extra, error", [
    (["--tasks", "longbench_nope"], r"error: unknown task longbench_nope: the offline tasks "
                                    r"are longbench_2wikimqa, .* and the tags .*ruler_niah"),
    (["--max-length", "0"], r"error: argument --max-length: invalid whole number >= 1 value: '0'"),
    (["--max-gen-toks", "512", "--tasks", "rat_longqa"],
     r"error: max_gen_toks=512 leaves no room for a prompt within max_length=512"),
    (["--longbench-dir", "/nonexistent"], r"error: longbench_narrativeqa: "
                                          r"/nonexistent/narrativeqa.jsonl not found"),
    (["--ruler-lengths", "1024"], r"error: niah_single_1: max_seq_lengths \[1024\] exceed "
                                  r"max_length 512"),
    (["--ruler-lengths", "500"], r"error: niah_single_1: max_seq_lengths \[500\] are not "
                                 r"reported: give powers of two"),
])
def test_bad_input_is_one_line(extra, error, small_model_dir, local_data, tmp_path, capsys):
    args = score(small_model_dir, local_data, tmp_path / "out", "--limit", "1")
    for flag, value in zip(extra[::2], extra[1::2]):
        args[args.index(flag) + 1] = value
    code, out, err = run_main(score_generation.main, args, capsys)
    assert code in (1, 2)
    assert re.match(error, err.splitlines()[-1]), err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, local_data, capsys):
    code, _, err = run_main(score_generation.main,
                            score(tmp_path, local_data, tmp_path / "out"), capsys)
    assert code == 1
    assert err.splitlines()[-1] == (f"error: {tmp_path}/config.json is missing or not JSON: "
                                    "give a folder from tools/convert_checkpoint.py or its "
                                    "--to-hf export")

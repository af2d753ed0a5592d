"""lm-evaluation-harness on an exported model (``rat_plugin/eval/harness.py``), offline: the
shipped local tasks (tests/lm_eval_tasks: task YAML + JSONL) through lm_eval's evaluator,
checked against accuracies computed by hand from the model's own log-likelihoods (one plain
forward per choice, no batching, no padding) and against a plain greedy loop without the decode
cache. Two routes: our model ``rat`` on the standalone folder, and lm_eval's own ``hf`` model
on the folder's ``--to-hf`` export, run where rat_plugin cannot be imported (the export's
generated code, ``trust_remote_code=True``; the ``isolated_export`` fixture): the two agree
per request on loglikelihood, generate_until and (with ``add_bos_token=False``, see the README)
loglikelihood_rolling."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, run_main
from rat_plugin.generate import load, load_tokenizer
from rat_plugin.generate.loading import special_token_ids

TASKS = REPO / "tests" / "lm_eval_tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Oracle:
    """The model and tokenizer of a folder, scored the plain way."""

    def __init__(self, folder, add_bos: bool = True):
        self.model = load(folder)
        self.tokenizer = load_tokenizer(folder)
        bos, self.eos = special_token_ids(folder, self.tokenizer)
        self.prefix = [bos] if add_bos else []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> float:
        """lm_eval's split: the continuation is what encoding context + continuation adds."""
        context_ids = self.prefix + self.encode(context)
        whole = self.prefix + self.encode(context + continuation)
        n = len(whole) - len(context_ids)
        logprobs = self.model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)
        return float(sum(logprobs[t - 1, whole[t]] for t in range(len(whole) - n, len(whole))))

    @torch.no_grad()
    def greedy(self, context: str, max_new: int, until: str) -> str:
        tokens = self.prefix + self.encode(context)
        new = []
        for _ in range(max_new):
            token = int(self.model(torch.tensor([tokens + new]))[0, -1].argmax())
            if token == self.eos:
                break
            new.append(token)
            if self.tokenizer.decode([token]) == until:
                break
        return self.tokenizer.decode(new).split(until)[0]


def hand_accuracies(oracle: Oracle, docs: list[dict]) -> tuple[float, float, list]:
    """(acc, acc_norm, per-doc choice log-likelihoods) as lm_eval defines them: the argmax of
    the log-likelihoods, and of the log-likelihoods per character of the choice."""
    acc = acc_norm = 0.0
    lls = []
    for doc in docs:
        ll = [oracle.loglikelihood(doc["context"], " " + c) for c in doc["choices"]]
        per_char = [v / len(c) for v, c in zip(ll, doc["choices"])]
        acc += max(range(len(ll)), key=ll.__getitem__) == doc["label"]
        acc_norm += max(range(len(ll)), key=per_char.__getitem__) == doc["label"]
        lls.append(ll)
    return acc / len(docs), acc_norm / len(docs), lls


# lm_eval's own evaluator on the local tasks, in a fresh process with the hub off. (Its command
# line, ``python -m rat_plugin.eval``, runs the same evaluator after indexing every built-in task
# YAML, about 20 s; include_defaults=False skips that.)
EVALUATE = """
import json, sys
import rat_plugin.eval.harness
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
model, model_args, tasks, out = sys.argv[1:]
result = simple_evaluate(
    model=model, model_args=model_args,
    tasks=["rat_story_choice", "rat_story_words", "rat_story_text"],
    task_manager=TaskManager(include_path=tasks, include_defaults=False), batch_size=4,
    device="cpu", log_samples=True)
with open(out, "w") as f:
    json.dump({"results": result["results"], "samples": result["samples"]}, f, default=str)
"""


def by_doc(samples: dict) -> dict:
    return {task: sorted(s, key=lambda s: int(s["doc_id"])) for task, s in samples.items()}


@pytest.fixture(scope="module")
def evaluation(small_model_dir, tmp_path_factory):
    """(lm_eval results, samples by task, the oracle) of the ``rat`` route."""
    root = tmp_path_factory.mktemp("lm_eval_rat")
    run = subprocess.run(
        [sys.executable, "-c", EVALUATE, "rat", f"pretrained={small_model_dir}", str(TASKS),
         str(root / "evaluation.json")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", **OFFLINE),
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    evaluation = json.loads((root / "evaluation.json").read_text())
    return evaluation["results"], by_doc(evaluation["samples"]), Oracle(small_model_dir)


@pytest.mark.slow
def test_multiple_choice_accuracy_equals_the_hand_computation(evaluation):
    results, samples, oracle = evaluation
    docs = read_jsonl(TASKS / "rat_story_choice.jsonl")
    acc, acc_norm, lls = hand_accuracies(oracle, docs)
    assert results["rat_story_choice"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert results["rat_story_choice"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)
    assert 0 < acc < 1  # a task the model neither always passes nor always fails
    for sample, want in zip(samples["rat_story_choice"], lls):
        got = [float(ll) for ll, _ in sample["filtered_resps"]]  # logged as strings
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_generate_until_is_the_plain_greedy_continuation(evaluation):
    results, samples, oracle = evaluation
    docs = read_jsonl(TASKS / "rat_story_words.jsonl")
    want = [oracle.greedy(doc["context"], 6, ".") for doc in docs]
    assert [s["filtered_resps"][0] for s in samples["rat_story_words"]] == want
    matches = sum(w.strip() == doc["target"] for w, doc in zip(want, docs)) / len(docs)
    assert results["rat_story_words"]["exact_match,none"] == pytest.approx(matches)


# ---- the model class in this process ----------------------------------------------------------

@pytest.fixture(scope="module")
def harness():
    import rat_plugin.eval.harness as harness

    return harness


def requests(pairs) -> list:
    return [SimpleNamespace(args=pair) for pair in pairs]


def test_loglikelihood_is_one_forward_per_batch_without_bos_on_request(harness,
                                                                        small_model_dir):
    lm = harness.RATHarnessModel(pretrained=str(small_model_dir), batch_size=3, add_bos=False)
    oracle = Oracle(small_model_dir, add_bos=False)
    assert lm.tok_encode("The fox") == oracle.encode("The fox")  # no BOS
    assert lm.prefix_token_id == oracle.eos  # an empty context is EOS, lm_eval's default
    docs = read_jsonl(TASKS / "rat_story_choice.jsonl")[:2]
    pairs = [(doc["context"], " " + choice) for doc in docs for choice in doc["choices"]]
    pairs.append(("Anna", " saw a big dog near the old bridge and the small boat"))
    forwards = []
    lm.model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape))
    got = lm.loglikelihood(requests(pairs), disable_tqdm=True)
    assert len(forwards) == 3  # 7 requests in batches of 3: one forward per batch
    assert forwards[0][0] == 3 and forwards[-1][0] == 1
    want = [oracle.loglikelihood(*pair) for pair in pairs]
    assert [ll for ll, _ in got] == pytest.approx(want, abs=1e-5)


def test_default_encoding_starts_with_bos(harness, small_model_dir):
    lm = harness.RATHarnessModel(pretrained=str(small_model_dir))
    oracle = Oracle(small_model_dir)
    assert lm.tok_encode("The fox") == oracle.prefix + oracle.encode("The fox")
    assert lm.prefix_token_id == oracle.prefix[0]


def test_loglikelihood_rolling_scores_every_token(harness, small_model_dir):
    lm = harness.RATHarnessModel(pretrained=str(small_model_dir))
    oracle = Oracle(small_model_dir)
    text = "In the morning, Anna walked to the garden. The weather was sunny."
    tokens = oracle.prefix + oracle.encode(text)
    assert len(tokens) <= lm.max_length  # one window: the whole document after BOS
    with torch.no_grad():
        logprobs = oracle.model(torch.tensor([tokens[:-1]]))[0].log_softmax(-1)
    want = float(sum(logprobs[t - 1, tokens[t]] for t in range(1, len(tokens))))
    (got,) = lm.loglikelihood_rolling(requests([(text,)]), disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-5)


def test_empty_stop_strings_and_continuations(harness, small_model_dir):
    """Task YAMLs may stop on "" (which stops nothing) or score an empty continuation
    (probability 1); neither may crash the run."""
    lm = harness.RATHarnessModel(pretrained=str(small_model_dir))
    oracle = Oracle(small_model_dir)
    for until in ([""], ""):
        (text,) = lm.generate_until(requests([("Anna", {"until": until, "max_gen_toks": 5})]))
        assert text == oracle.greedy("Anna", 5, until="\0")  # a stop string that never occurs
    got = lm.loglikelihood(requests([("Anna", ""), ("Anna", " saw")]), disable_tqdm=True)
    assert got[0] == (0.0, True)
    assert got[1][0] == pytest.approx(oracle.loglikelihood("Anna", " saw"), abs=1e-5)


@pytest.mark.parametrize("args,error", [
    ({"batch_size": "auto"}, r"batch_size='auto': give a whole number >= 1 \(no 'auto' for rat\)"),
    ({"add_bos": "no"}, r"add_bos='no': give True or False"),
    ({"max_length": -1}, r"^max_length=-1 must be >= 1$"),
    ({"max_length": "4k"}, r"^max_length='4k' is a str: give a whole number of tokens >= 1"),
])
def test_bad_model_args_are_one_line(harness, small_model_dir, args, error):
    with pytest.raises((ValueError, TypeError), match=error):
        harness.RATHarnessModel(pretrained=str(small_model_dir), **args)


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    from rat_plugin.eval.__main__ import main

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval fails
    monkeypatch.delitem(sys.modules, "rat_plugin.eval.harness", raising=False)
    code, out, err = run_main(lambda argv: main(), [], capsys)
    assert code == 1
    assert err == "error: lm-evaluation-harness is not installed: pip install -e '.[eval]'\n"


def lls(sample) -> list[float]:
    """A sample's log-likelihoods (loglikelihood: one per choice; rolling: one)."""
    return [float(v[0] if isinstance(v, list) else v)  # logged as strings
            for v in sample["filtered_resps"]]


@pytest.mark.slow
def test_rolling_loglikelihood_is_the_document_after_bos(evaluation):
    """Perplexity tasks: a document of one window scores every token after BOS."""
    _, samples, oracle = evaluation
    docs = read_jsonl(TASKS / "rat_story_text.jsonl")
    for doc, sample in zip(docs[1:], samples["rat_story_text"][1:]):
        tokens = oracle.prefix + oracle.encode(doc["text"])
        with torch.no_grad():
            logprobs = oracle.model(torch.tensor([tokens[:-1]]))[0].log_softmax(-1)
        want = float(sum(logprobs[t - 1, tokens[t]] for t in range(1, len(tokens))))
        assert lls(sample) == pytest.approx([want], abs=1e-5)


@pytest.mark.slow
def test_hf_route_without_rat_plugin_equals_rat_per_request(evaluation, isolated_export):
    """lm_eval's hf model on the export's generated code and our rat model, request by request:
    loglikelihood and generate_until with lm_eval's defaults, loglikelihood_rolling with
    add_bos_token=False. With the defaults lm_eval 0.4.13 puts its prefix token (BOS) before a
    text the tokenizer already starts with BOS: it scores BOS + BOS + text (checked here, so a
    release that changes it shows)."""
    _, rat, oracle = evaluation
    hf = {name: by_doc(samples) for name, samples in isolated_export["samples"].items()}
    for ours, theirs in zip(rat["rat_story_choice"], hf["default"]["rat_story_choice"]):
        assert lls(theirs) == pytest.approx(lls(ours), abs=1e-5)
    assert [s["filtered_resps"] for s in hf["default"]["rat_story_words"]] == \
        [s["filtered_resps"] for s in rat["rat_story_words"]]
    for ours, theirs in zip(rat["rat_story_text"], hf["rolling"]["rat_story_text"]):
        assert lls(theirs) == pytest.approx(lls(ours), abs=1e-5)
    docs = read_jsonl(TASKS / "rat_story_text.jsonl")
    for doc, sample in zip(docs[1:], hf["default"]["rat_story_text"][1:]):
        tokens = oracle.prefix * 2 + oracle.encode(doc["text"])
        with torch.no_grad():
            logprobs = oracle.model(torch.tensor([tokens[:-1]]))[0].log_softmax(-1)
        want = float(sum(logprobs[t - 1, tokens[t]] for t in range(1, len(tokens))))
        assert lls(sample) == pytest.approx([want], abs=1e-5)


def test_hf_route_equals_rat_for_a_model_trained_without_bos(harness, small_model_dir, tmp_path):
    """A paper import (add_bos: false): its export's tokenizer adds and names no BOS, so lm_eval's
    hf model starts empty contexts and rolling windows with EOS and texts with nothing, as our
    rat model does by default for that folder (and the paper's harness wrapper)."""
    import shutil

    from lm_eval.models.huggingface import HFLM

    from rat_plugin.hf.export import folder_to_hf

    folder = tmp_path / "model"
    shutil.copytree(small_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "add_bos": False}))
    folder_to_hf(folder, tmp_path / "hf", log=lambda _: None)
    rat = harness.RATHarnessModel(pretrained=str(folder), batch_size=2)
    hf = HFLM(pretrained=str(tmp_path / "hf"), backend="causal", device="cpu", dtype="float32",
              batch_size=2)
    oracle = Oracle(folder, add_bos=False)
    assert rat.prefix_token_id == hf.prefix_token_id == oracle.eos
    text = read_jsonl(TASKS / "rat_story_text.jsonl")[0]["text"]
    assert hf.tok_encode(text) == rat.tok_encode(text) == oracle.encode(text)
    got = [lm.loglikelihood_rolling(requests([(text,)]), disable_tqdm=True) for lm in (rat, hf)]
    assert got[1] == pytest.approx(got[0], abs=1e-5)
    pairs = [("", " The weather was sunny."), ("Anna", " saw a big dog")]
    got = [[ll for ll, _ in lm.loglikelihood(requests(pairs), disable_tqdm=True)]
           for lm in (rat, hf)]
    assert got[1] == pytest.approx(got[0], abs=1e-5)
    assert got[0][1] == pytest.approx(oracle.loglikelihood(*pairs[1]), abs=1e-5)
    options = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
    asked = requests([("In the morning, Nora walked to the", options), ("The weather was", options)])
    assert hf.generate_until(asked, disable_tqdm=True) == rat.generate_until(asked)

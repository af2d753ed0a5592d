"""LongBench's scoring (rat_plugin/eval/longbench.py) on hand-made cases whose values are worked
out by hand below, and the offline task YAMLs against lm_eval's own definitions."""

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from conftest import REPO
from rat_plugin.eval import longbench
from rat_plugin.eval.local_tasks import LONGBENCH_METRICS, longbench_results, longqa_results

TASKS = REPO / "rat_plugin" / "eval" / "tasks"


@pytest.mark.parametrize("text, normal", [
    ("The  Cat, sat!", "cat sat"),  # lowercase, punctuation, article, spaces
    ("An apple a day", "apple day"),
    ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("...", ""),
])
def test_normalize_answer(text, normal):
    assert longbench.normalize_answer(text) == normal


def test_qa_f1_is_token_f1_after_normalisation():
    # "red ball" vs "ball": 1 common token, precision 1/2, recall 1: F1 = 2/3.
    assert longbench.qa_f1("The red ball.", "a ball") == pytest.approx(2 / 3)
    # Repeats count once per occurrence in both: "ball ball" vs "ball": 1 common, P 1/2, R 1.
    assert longbench.qa_f1("ball ball", "ball") == pytest.approx(2 / 3)
    # "anna saw dog" vs "dog anna": 2 common, P 2/3, R 1: F1 = 0.8 (order does not matter).
    assert longbench.qa_f1("Anna saw the dog", "dog, Anna") == pytest.approx(0.8)
    assert longbench.qa_f1("Ball", "ball!") == 1.0
    for empty in ("", "  ", "the", "?!"):  # nothing left after normalisation scores 0
        assert longbench.qa_f1(empty, "ball") == 0.0
    assert longbench.qa_f1("ball", "") == 0.0


def test_exact_match_compares_the_normalised_texts():
    assert longbench.exact_match("The Ball.", "ball") == 1.0
    assert longbench.exact_match("balls", "ball") == 0.0
    assert longbench.exact_match("", "") == 1.0


def test_rouge_l_is_the_rouge_packages_summary_level_lcs_over_distinct_words():
    # One sentence each. The LCS of "the cat lay on the mat" and "the cat sat on the mat" is
    # "the cat on the mat"; its distinct words {the, cat, on, mat} are 4, over 5 distinct words
    # in each text: P = R = 4/5, F = 0.8 (a plain LCS F would be 5/6).
    assert longbench.rouge_l("the cat sat on the mat", "the cat lay on the mat") == \
        pytest.approx(0.8, abs=1e-7)
    # Sentences split at ".": "c" and "a b" each match the reference sentence "a b c", whose
    # words {c} and {a, b} together cover it: F = 1 (the whole-text LCS would be 2 of 3).
    assert longbench.rouge_l("c. a b", "a b c") == pytest.approx(1.0, abs=1e-7)
    # No lowercasing, no punctuation removal other than the sentence split.
    assert longbench.rouge_l("Cat", "cat") == 0.0
    assert longbench.rouge_l("cat,", "cat") == 0.0
    # "x y z" vs "x q": LCS {x}; P = 1/3, R = 1/2, F = 2 * (1/6) / (5/6) = 0.4.
    assert longbench.rouge_l("x y z", "x q") == pytest.approx(0.4, abs=1e-7)
    # A text without a sentence scores 0, as LongBench's except-clause does.
    for empty in ("", ".", "..."):
        assert longbench.rouge_l(empty, "a b") == 0.0
        assert longbench.rouge_l("a b", empty) == 0.0


def test_the_best_reference_counts():
    assert longbench.best("qa_f1_score", "red ball", ["dog", "a red ball", "ball"]) == 1.0
    assert longbench.best("qa_f1_score", "red ball", ["dog", "ball"]) == pytest.approx(2 / 3)
    assert longbench.best("rouge_score", "x y z", ["q", "x q"]) == pytest.approx(0.4, abs=1e-7)
    assert longbench.best("exact_match", "Ball", ["dog", "the ball"]) == 1.0
    assert longbench.best("qa_f1_score", "ball", []) == 0.0


def test_the_few_shot_tasks_keep_the_first_line():
    assert longbench.postprocess("trec", "\n\nLocation\nQuestion: x") == "Location"
    assert longbench.postprocess("samsum", "one\ntwo") == "one"
    assert longbench.postprocess("narrativeqa", "one\ntwo") == "one\ntwo"


def test_classification_retrieval_and_count():
    classes = ["a", "ab", "abc", "dog"]
    # "dog or abc" names a, ab, abc and dog (substrings), none part of "dog": 1 / 4.
    assert longbench.classification("dog or abc", "dog", classes) == 0.25
    # "a", "ab", "abc" named, reference "abc": LongBench drops "a" (part of the reference)
    # while iterating, which skips "ab": 1 / 2.
    assert longbench.classification("abc", "abc", classes) == 0.5
    assert longbench.classification("dog", "abc", classes) == 0.0
    assert longbench.retrieval("Paragraph 2, or 12", "Paragraph 12") == 0.5
    assert longbench.retrieval("no number", "Paragraph 12") == 0.0
    assert longbench.count("3 or 3 or 4", "3") == pytest.approx(2 / 3)


def test_task_results_post_process_and_take_the_best_answer():
    doc = {"dataset": "triviaqa", "answers": ["Paris", "paris france"], "all_classes": None}
    assert longbench_results(doc, ["  Paris, France\nQuestion: next"]) == \
        {"score": 1.0, "qa_f1_score": 1.0}  # first line, then the second answer matches
    doc = {"dataset": "trec", "answers": ["Location"], "all_classes": ["Location", "City"]}
    assert longbench_results(doc, ["City or Location"]) == \
        {"score": 0.5, "classification_score": 0.5}
    doc = {"answers": ["Oscar", "the drummer"]}
    assert longqa_results(doc, [" oscar.\n"]) == \
        {"score": 1.0, "qa_f1_score": 1.0, "exact_match": 1.0}
    # "oscar drummer" against "oscar" or "drummer": 1 common token, P 1/2, R 1: 2/3 either way.
    assert longqa_results(doc, ["Oscar the drummer"]) == \
        {"score": pytest.approx(2 / 3), "qa_f1_score": pytest.approx(2 / 3), "exact_match": 0.0}


@pytest.mark.parametrize("name", sorted(LONGBENCH_METRICS))
def test_offline_longbench_tasks_are_lm_evals(name):
    """Each offline task keeps lm_eval 0.4.13's prompt, generation settings and metric names;
    only where the records come from and who scores them change."""
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "longbench" / f"{name}.yaml",
                       resolve_func=False)
    ours = load_yaml(TASKS / "longbench" / f"{name}.yaml", resolve_func=False)
    for key in ("task", "tag", "doc_to_text", "doc_to_target", "generation_kwargs",
                "metric_list", "test_split"):
        assert ours[key] == theirs[key], key
    assert ours.get("target_delimiter") == theirs.get("target_delimiter")
    assert ours["dataset_kwargs"] == {"longbench_name": name}
    assert ours["process_results"].endswith("rat_plugin.eval.local_tasks.longbench_results")
    assert [m["metric"] for m in ours["metric_list"]] == ["score", LONGBENCH_METRICS[name]]


def test_longbench_records_get_the_question_field(tmp_path):
    from rat_plugin.eval.local_tasks import TaskDataError, longbench_dataset

    record = {"input": "Who?", "context": "Anna.", "answers": ["Anna"], "length": 1,
              "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": "0"}
    (tmp_path / "narrativeqa.jsonl").write_text(json.dumps(record) + "\n")
    (doc,) = longbench_dataset("narrativeqa", str(tmp_path))["test"]
    assert doc["question"] == "Who?" and doc["dataset"] == "narrativeqa"
    with pytest.raises(TaskDataError, match=r"longbench_qmsum: .*qmsum.jsonl not found: unzip"):
        longbench_dataset("qmsum", str(tmp_path))
    with pytest.raises(TaskDataError, match=r"pass --metadata '\{\"longbench_dir\""):
        longbench_dataset("qmsum", None)

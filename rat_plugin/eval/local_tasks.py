"""The data and scoring functions of the offline lm_eval tasks in ``rat_plugin/eval/tasks/``
(named in their YAMLs with ``!function``): LongBench tasks and ``rat_longqa`` read from local
JSONL files, RULER's needle tasks generated from a local haystack text.

lm_eval hands each ``custom_dataset`` function the task's metadata: ``--metadata`` (JSON) merged
over ``--model_args``. The keys read here:

- ``longbench_dir``: the folder of LongBench's files (``narrativeqa.jsonl`` ..., from
  THUDM/LongBench's ``data.zip``); required by the ``longbench_*`` tasks.
- ``rat_longqa_dir`` (default ``assets/data/rat_longqa``), ``rat_longqa_split`` (``test``),
  ``rat_longqa_template`` (``rat_longqa``: a name in ``rat_plugin.data.templates.TEMPLATES``
  or a template string).
- ``haystack``: a text file (or a JSONL of ``{"text": ...}`` records, e.g. the debug corpus)
  for RULER's essay haystack; required by the essay tasks.
- ``max_seq_lengths`` (default: ``max_length``, else the model folder's training length; none
  beyond it, where the prompts would be cut),
  ``num_samples`` (RULER's 500), ``tokens_to_generate`` (RULER's 128), ``seed`` (42);
  ``pretrained`` (the model folder: its tokenizer sizes the prompts), ``add_bos``.
"""

import json
from pathlib import Path

from rat_plugin.data.templates import render
from rat_plugin.eval import longbench, ruler

TASKS_DIR = Path(__file__).parent / "tasks"  # the YAMLs: lm_eval's --include_path
LONGQA_DIR = "assets/data/rat_longqa"
RULER_LENGTHS = tuple(2**k for k in range(6, 18))  # the lengths the niah YAMLs report: 64..128K


class TaskDataError(ValueError):
    """A local task file or setting that is missing or wrong; the message is one line."""


def read_jsonl(path: Path, task: str, hint: str) -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"{task}: {path} not found: {hint}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise TaskDataError(f"{task}: {path} line {number} is not JSON") from None
    if not records:
        raise TaskDataError(f"{task}: {path} holds no record")
    return records


def _test_split(records: list[dict]) -> dict:
    from datasets import Dataset

    return {"test": Dataset.from_list(records)}


# ---- LongBench ---------------------------------------------------------------------------

def longbench_dataset(longbench_name: str, longbench_dir: str | None = None, **_) -> dict:
    """``{longbench_dir}/{longbench_name}.jsonl`` in LongBench's record format; lm_eval's
    prompts name the question ``question`` where LongBench's files have ``input``."""
    task = f"longbench_{longbench_name}"
    if not longbench_dir:
        raise TaskDataError(f"{task} reads LongBench's files from disk: pass --metadata "
                            "'{\"longbench_dir\": \"path/to/LongBench/data\"}'")
    records = read_jsonl(Path(longbench_dir) / f"{longbench_name}.jsonl", task,
                         "unzip THUDM/LongBench's data.zip there")
    for record in records:
        record.setdefault("question", record.get("input"))
        record.setdefault("all_classes", None)
        record["dataset"] = longbench_name
    return _test_split(records)


LONGBENCH_METRICS = {
    "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
    "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score", "musique": "qa_f1_score",
    "gov_report": "rouge_score", "qmsum": "rouge_score", "multi_news": "rouge_score",
    "trec": "classification_score", "triviaqa": "qa_f1_score", "samsum": "rouge_score",
    "passage_count": "count_score", "passage_retrieval_en": "retrieval_score",
}  # LongBench's eval.py, its English tasks but the code ones


def longbench_results(doc: dict, results: list[str]) -> dict:
    """LongBench's score of one generation: post-processed, best over the answers; reported as
    ``score`` and under the metric's name (lm_eval's longbench convention)."""
    name = doc["dataset"]
    metric = LONGBENCH_METRICS[name]
    extra = {"all_classes": doc["all_classes"]} if metric == "classification_score" else {}
    prediction = longbench.postprocess(name, results[0].strip())
    score = longbench.best(metric, prediction, doc["answers"], **extra)
    return {"score": score, metric: score}


# ---- the generated long-context QA set ---------------------------------------------------

def longqa_dataset(rat_longqa_dir: str = LONGQA_DIR, rat_longqa_split: str = "test",
                   rat_longqa_template: str = "rat_longqa", **_) -> dict:
    """The generated QA set's split, each record's prompt rendered by the fine-tuning template
    (the answer follows it in training; here the model writes it)."""
    records = read_jsonl(Path(rat_longqa_dir) / f"{rat_longqa_split}.jsonl", "rat_longqa",
                         "write it with `python -m rat_plugin.data.prepare`")
    for record in records:
        record["prompt"] = render(rat_longqa_template, record)
    return _test_split(records)


def longqa_results(doc: dict, results: list[str]) -> dict:
    prediction = results[0].strip()
    f1 = longbench.best("qa_f1_score", prediction, doc["answers"])
    return {"score": f1, "qa_f1_score": f1,
            "exact_match": longbench.best("exact_match", prediction, doc["answers"])}


# ---- RULER's needle tasks ----------------------------------------------------------------

def _folder_config(pretrained: str | None) -> dict:
    if not pretrained:
        raise TaskDataError("RULER's tasks size their prompts with the model's tokenizer: give "
                            "the model folder as model_args pretrained=...")
    try:
        return json.loads((Path(pretrained) / "config.json").read_text())
    except (OSError, ValueError):
        raise TaskDataError(f"{pretrained}/config.json is missing or not JSON: give a model "
                            "folder (tools/convert_checkpoint.py, or its --to-hf export)") from None


def _haystack_words(task: str, haystack: str | None) -> list[str]:
    if not haystack:
        raise TaskDataError(f"{task} hides its needles in a text: pass --metadata "
                            "'{\"haystack\": \"a .txt file, or a .jsonl of {\\\"text\\\": ...}\"}'")
    path = Path(haystack)
    if path.suffix == ".jsonl":
        text = " ".join(r["text"] for r in read_jsonl(path, task, "give the haystack text"))
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        raise TaskDataError(f"{task}: haystack {path} not found: give a text file")
    return text.split()


def niah_dataset(task: str, pretrained: str | None = None, max_length: int | None = None,
                 max_seq_lengths=None, haystack: str | None = None, num_samples: int = 500,
                 tokens_to_generate: int = ruler.TOKENS_TO_GENERATE, seed: int = 42,
                 add_bos: bool | None = None, **_) -> dict:
    from rat_plugin.generate import load_tokenizer
    from rat_plugin.generate.loading import special_token_ids

    config = _folder_config(pretrained)
    needles = ruler.TASKS[task]
    max_length = max_length or config.get("max_seq_len") or config["args"]["max_seq_len"]
    lengths = max_seq_lengths or [max_length]
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    unknown = [n for n in lengths if n not in RULER_LENGTHS]
    if unknown:
        raise TaskDataError(f"{task}: max_seq_lengths {unknown} are not reported: give powers "
                            f"of two from {RULER_LENGTHS[0]} to {RULER_LENGTHS[-1]}")
    if max(lengths) > max_length:
        raise TaskDataError(f"{task}: max_seq_lengths {lengths} exceed max_length {max_length}, "
                            "which would cut the prompts: raise max_length or lower them")
    tokenizer = load_tokenizer(pretrained)
    bos, _ = special_token_ids(pretrained, tokenizer)
    if add_bos is None:
        add_bos = config.get("add_bos", True)
    prefix = [bos] if add_bos and bos is not None else []
    generator = ruler.Generator(
        needles, lambda text: prefix + tokenizer.encode(text, add_special_tokens=False).ids,
        _haystack_words(task, haystack) if needles.haystack == "essay" else (),
        tokens_to_generate)
    try:
        samples = [s for n in lengths for s in generator.samples(n, num_samples, seed)]
    except ValueError as err:
        raise TaskDataError(f"{task}: {err}") from None
    return _test_split(samples)


def _niah(task: str):
    def dataset(**metadata) -> dict:
        return niah_dataset(task, **metadata)

    dataset.__name__ = task
    return dataset


# One custom_dataset per task (a YAML names a function, not its arguments).
niah_single_1, niah_single_2, niah_single_3 = map(_niah, list(ruler.TASKS)[:3])
niah_multikey_1, niah_multikey_2, niah_multikey_3 = map(_niah, list(ruler.TASKS)[3:6])
niah_multivalue, niah_multiquery = map(_niah, list(ruler.TASKS)[6:])


def niah_results(doc: dict, results: list[str]) -> dict:
    """RULER's string_match_all (lm_eval's): the share of the needles' values the answer
    contains (case-insensitive), as ``score`` and under the prompt's length."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    score = string_match_all(postprocess_pred(results), [doc["outputs"]])
    return {"score": score, str(doc["max_length"]): score}


def mean_over_samples(scores: list[float]) -> float:
    """lm_eval's RULER aggregation: the mean over the samples of one length (-1 for none)."""
    from lm_eval.tasks.ruler.common_utils import aggregate_metrics

    return aggregate_metrics(scores)

"""LongBench's answer scoring (THUDM/LongBench ``metrics.py`` and ``eval.py``), plain Python.

Every metric scores one prediction against one reference; ``best`` takes the best over a
record's references, as LongBench's ``scorer`` does, after the task's post-processing
(``postprocess``: the first line for the few-shot tasks).

- ``qa_f1``: token F1 after ``normalize_answer`` (lowercase, punctuation, articles a/an/the and
  extra white space removed); 0 when nothing matches, an empty prediction included.
- ``rouge_l``: ROUGE-L F as LongBench computes it with the ``rouge`` package (1.0.1,
  ``Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]``): texts split
  into sentences at ".", sentences into words at single spaces after white space is collapsed,
  no lowercasing; the summary-level union LCS over *distinct* words (the words of one LCS per
  reference sentence x prediction sentence, the LCS chosen by the package's backtrack), over
  the distinct words of each text; 0 for a text without a sentence (empty, or only dots), as
  LongBench's ``except: return 0.0``. (``rouge_score``, Google's package that lm_eval installs,
  lowercases, keeps only alphanumerics and counts repeated words: a different number.) The
  package's recursive backtrack fails on sentences of ~1000 words, which LongBench scores 0;
  this loop does not.
- ``exact_match``: the normalised texts are equal (not in LongBench; the SQuAD convention).
- ``classification``, ``retrieval``, ``count``: trec, passage_retrieval_en, passage_count.

The Chinese tasks (jieba) and the code tasks (fuzzywuzzy) are not here.
"""

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")  # LongBench's eval.py
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, the articles a/an/the and extra white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _sentences(text: str) -> list[list[str]]:
    """The ``rouge`` package's words of each sentence: split at ".", white space collapsed,
    then split at " " (a blank sentence is one empty word)."""
    return [" ".join(part.split()).split(" ") for part in text.split(".") if part]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the LCS of x and y that the ``rouge`` package's backtrack picks."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    words, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    union = set().union(*(_lcs_words(r, h) for r in ref for h in hyp))
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def classification(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """1 / (number of classes named) when the reference is among them; a named class that is
    part of the reference (and not it) is dropped, as LongBench drops it: while iterating over
    the list, so the class after a dropped one stays."""
    named = [c for c in all_classes if c in prediction]
    index = 0
    while index < len(named):
        if named[index] in reference and named[index] != reference:
            named.remove(named[index])
        index += 1
    return 1.0 / len(named) if reference in named else 0.0


def _share_of(number: str, prediction: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == number for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str) -> float:
    """The share of the numbers in the prediction that are the reference's paragraph number."""
    return _share_of(re.findall(r"Paragraph (\d+)", reference)[0], prediction)


def count(prediction: str, reference: str) -> float:
    """The share of the numbers in the prediction that equal the reference."""
    return _share_of(str(reference), prediction)


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1, "rouge_score": rouge_l, "exact_match": exact_match,
    "classification_score": classification, "retrieval_score": retrieval,
    "count_score": count,
}


def postprocess(task: str, prediction: str) -> str:
    """LongBench's: the few-shot tasks keep the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0] if task in FIRST_LINE_TASKS else prediction


def best(metric: str, prediction: str, references: Sequence[str], **kwargs) -> float:
    """The best score over the references (0 without any)."""
    score = METRICS[metric]
    return max((score(prediction, r, **kwargs) for r in references), default=0.0)

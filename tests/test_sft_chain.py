"""The fine-tuning chain on a CPU: a debug model pretrained by torchtitan's trainer, fine-tuned on
the generated long-context QA set with train_configs/rat_debug_sft.toml (2 CPU ranks), then
greedy answers on the held-out test split scored by exact match and token F1, before and after.

The pretrained model continues the story instead of answering (EM 0); after fine-tuning it copies
the name or object the question's fact states, from anywhere in a 150-400 token context (the
figures below, README "Fine-tuning")."""

import json
import re
import string
from collections import Counter

import pytest
import torch

from conftest import REPO, launch, tb_losses

PRETRAIN_STEPS = 30
TEST_RECORDS = 100
MAX_NEW_TOKENS = 8


def normalize(text: str) -> list[str]:
    """LongBench's answer normalization: lower case, no punctuation or articles, words."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(prediction: str, answer: str) -> float:
    got, want = normalize(prediction), normalize(answer)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score(model_dir, records) -> tuple[float, float, list[str]]:
    """(exact match %, token F1 %, answers) of greedy answers to ``records``."""
    from rat_plugin.data.templates import middle_truncate, render
    from rat_plugin.generate import generate, load, load_tokenizer
    from rat_plugin.generate.loading import special_token_ids

    model = load(model_dir)
    tokenizer = load_tokenizer(model_dir)
    bos, eos = special_token_ids(model_dir, tokenizer)
    budget = model.args.max_seq_len - 1 - MAX_NEW_TOKENS  # room for BOS and the answer
    prompts = [[bos] + middle_truncate(tokenizer.encode(render("rat_longqa", r),
                                                        add_special_tokens=False).ids, budget)
               for r in records]
    result = generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, stop_tokens=[eos])
    answers = [tokenizer.decode([t for t in tokens if t != eos]).strip()
               for tokens in result.tokens]
    em = [normalize(a) == normalize(r["answers"][0]) for a, r in zip(answers, records)]
    f1s = [max(f1(a, ref) for ref in r["answers"]) for a, r in zip(answers, records)]
    return 100 * sum(em) / len(records), 100 * sum(f1s) / len(records), answers


def to_folder(step_dir, out, config: str):
    from rat_plugin.convert import dcp_to_standalone, spec_from_config

    spec = spec_from_config(REPO / "train_configs" / config)
    dcp_to_standalone(step_dir, out, spec, tokenizer_dir=REPO / "assets" / "tokenizer",
                      log=lambda _: None)
    return out


def test_scoring_helpers():
    assert normalize("The Ball!") == ["ball"]
    assert f1("a red ball", "the ball") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("Nora", "Nora.") == 1.0 and f1("", "Nora") == 0.0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fine_tuning_teaches_the_debug_model_to_answer(tmp_path, debug_assets):
    torch.set_num_threads(2)
    with open(debug_assets / "data" / "rat_longqa" / "test.jsonl") as f:
        records = [json.loads(line) for line in f][:TEST_RECORDS]

    pretrain = launch("rat_debug.toml", tmp_path / "pretrain", "--checkpoint.enable",
                      f"--training.steps={PRETRAIN_STEPS}",
                      f"--checkpoint.interval={PRETRAIN_STEPS}", "--validation.no-enable")
    assert pretrain.returncode == 0, pretrain.stdout[-4000:]
    seed = tmp_path / "pretrain" / "checkpoint" / f"step-{PRETRAIN_STEPS}"
    before_em, before_f1, before = score(to_folder(seed, tmp_path / "pretrained", "rat_debug.toml"),
                                         records)

    sft = launch("rat_debug_sft.toml", tmp_path / "sft", f"--checkpoint.initial_load_path={seed}",
                 timeout=900)
    assert sft.returncode == 0, sft.stdout[-4000:]
    assert f"Loading the checkpoint from {seed}" in sft.stdout
    assert "Instruction packing (rat_longqa, template 'rat_longqa', seq_len=512" in sft.stdout
    steps = max(tb_losses(tmp_path / "sft"))
    validation = tb_losses(tmp_path / "sft", "validation_metrics/loss")
    assert validation[steps] < validation[1] - 1.0, validation  # the answers' held-out loss

    tuned = to_folder(tmp_path / "sft" / "checkpoint" / f"step-{steps}", tmp_path / "tuned",
                      "rat_debug_sft.toml")
    after_em, after_f1, after = score(tuned, records)
    print(f"rat_longqa test ({TEST_RECORDS} records): EM {before_em:.1f} -> {after_em:.1f}, "
          f"F1 {before_f1:.1f} -> {after_f1:.1f}; e.g. {before[:3]} -> {after[:3]}")
    assert before_em <= 5 and before_f1 <= 10, (before_em, before_f1, before[:5])
    assert after_em >= 40 and after_f1 >= before_f1 + 35, (after_em, after_f1, after[:5])

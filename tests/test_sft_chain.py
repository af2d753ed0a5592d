"""The fine-tuning chain on a CPU (README "Fine-tuning"): a debug model pretrained by torchtitan's
trainer, fine-tuned on the generated long-context QA set with train_configs/rat_debug_sft.toml
(2 CPU ranks), then scored by generation with tools/score_generation.py on held-out test
records: exact match and LongBench's token F1 before and after, through lm_eval's ``rat`` model,
and the fine-tuned model again through ``hf_middle`` on its ``--to-hf`` export.

One pretraining, one fine-tuning and three scorings per session (a module fixture)."""

import json
import sys

import pytest

from conftest import REPO, launch, tb_losses

sys.path.insert(0, str(REPO / "tools"))
import score_generation  # noqa: E402

PRETRAIN_STEPS = 30
TEST_RECORDS = 50
MAX_LENGTH = 512  # one prompt budget for both models (the pretrained one trained at 256); the
# test prompts (at most 155 tokens) are cut by neither


def to_folder(step_dir, out, config: str):
    from rat_plugin.convert import dcp_to_standalone, spec_from_config

    spec = spec_from_config(REPO / "train_configs" / config)
    dcp_to_standalone(step_dir, out, spec, tokenizer_dir=REPO / "assets" / "tokenizer",
                      log=lambda _: None)
    return out


def score(folder, out) -> dict:
    """tools/score_generation.py on the first TEST_RECORDS records of rat_longqa's test split:
    its scores.json and samples."""
    argv = ["--model", str(folder), "--out", str(out), "--device", "cpu", "--tasks", "rat_longqa",
            "--rat-longqa-dir", str(REPO / "assets" / "data" / "rat_longqa"),
            "--limit", str(TEST_RECORDS), "--max-length", str(MAX_LENGTH), "--batch-size", "20"]
    assert score_generation.main(argv) == 0
    report = json.loads((out / "scores.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {"report": report, "samples": samples,
            "metrics": report["tasks"]["rat_longqa"]["metrics"]}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, debug_assets):
    from rat_plugin.hf.export import folder_to_hf

    root = tmp_path_factory.mktemp("sft_chain")
    pretrain = launch("rat_debug.toml", root / "pretrain", "--checkpoint.enable",
                      f"--training.steps={PRETRAIN_STEPS}",
                      f"--checkpoint.interval={PRETRAIN_STEPS}", "--validation.no-enable")
    assert pretrain.returncode == 0, pretrain.stdout[-4000:]
    seed = root / "pretrain" / "checkpoint" / f"step-{PRETRAIN_STEPS}"
    sft = launch("rat_debug_sft.toml", root / "sft", f"--checkpoint.initial_load_path={seed}",
                 timeout=900)
    assert sft.returncode == 0, sft.stdout[-4000:]
    steps = max(tb_losses(root / "sft"))
    tuned = to_folder(root / "sft" / "checkpoint" / f"step-{steps}", root / "tuned",
                      "rat_debug_sft.toml")
    folder_to_hf(tuned, root / "tuned_hf", log=lambda _: None)
    return {
        "seed": seed, "log": sft.stdout, "dump": root / "sft", "steps": steps,
        "before": score(to_folder(seed, root / "pretrained", "rat_debug.toml"), root / "s0"),
        "after": score(tuned, root / "s1"),
        "after_hf": score(root / "tuned_hf", root / "s2"),
    }


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fine_tuning_teaches_the_debug_model_to_answer(chain):
    log = chain["log"]
    assert f"Loading the checkpoint from {chain['seed']}" in log
    assert "Instruction packing (rat_longqa, template 'rat_longqa', seq_len=512" in log
    assert "Instruction packing (rat_longqa_validation," in log
    validation = tb_losses(chain["dump"], "validation_metrics/loss")
    assert validation[chain["steps"]] < validation[1] - 1.0, validation  # the answers' loss

    before, after = chain["before"]["metrics"], chain["after"]["metrics"]
    print(f"rat_longqa test ({TEST_RECORDS} records): exact match "
          f"{100 * before['exact_match']:.0f} -> {100 * after['exact_match']:.0f}, F1 "
          f"{100 * before['qa_f1_score']:.1f} -> {100 * after['qa_f1_score']:.1f}")
    # The pretrained model continues the story: no answer matches.
    assert before["exact_match"] == 0 and before["qa_f1_score"] < 0.02, before
    assert after["exact_match"] >= 0.5 and after["qa_f1_score"] >= 0.5, after


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rat_and_hf_routes_answer_the_fine_tuned_model_alike(chain):
    rat, hf = chain["after"], chain["after_hf"]
    assert (rat["report"]["lm_eval_model"], hf["report"]["lm_eval_model"]) == ("rat",
                                                                              "hf_middle")
    assert len(rat["samples"]) == TEST_RECORDS
    assert rat["samples"] == hf["samples"]
    assert rat["report"]["tasks"] == hf["report"]["tasks"]

"""The GPU check runner (tools/gpu_check.py) on CPU: its plan fits the visit, bad flags are one
line, a stage killed by its budget or a stopped run leaves a report saying so (the next stages
still run), and ``make gpu-check DRY=1`` runs every real stage at toy size into a complete
report of the documented schema.

The budget and stop tests run the real runner over stand-in stages (a tiny module that records
one figure and then, for the stage under test, sleeps), so the kill is certain and fast.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_main

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402
import gpu_check_plan  # noqa: E402
from gpu_check_stages import correctness, environment  # noqa: E402

STAGES = list(gpu_check_plan.STAGES)
LIMIT_FILES, LIMIT_BYTES = 8, 16 << 20


# -- the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_plan_fits_nine_minutes_and_keeps_the_baselines(gpu, capsys):
    code, out, _ = run_main(gpu_check.main, ["--plan", "--gpu", gpu], capsys)
    assert code == 0
    plan = gpu_check_plan.make_plan(gpu_check_plan.PROFILES[gpu])
    assert [s.name for s in plan.stages] == STAGES
    assert plan.total_budget_s + gpu_check_plan.RESERVE_S <= 540
    for stage in plan.stages:  # what runs fits its budget, every item from its own parts
        assert stage.items, f"{stage.name}: nothing planned"
        assert sum(sum(i.parts.values()) for i in stage.items) <= stage.budget_s / 1.1 + 1e-6
        for item in stage.items:
            assert f"{item.estimate_s:6.1f} s  {item.what}" in out
    assert f"budgets {plan.total_budget_s:.0f} s + 10 s reserve" in out
    trained = [i.params["kind"] for i in plan.stage("training").items]
    assert trained[:2] == ["rat", "rat_attn"]  # the recipe and its attention baseline first
    generated = [i.params["kind"] for i in plan.stage("generation").items]
    assert {"rat", "rat_attn"} <= set(generated)
    block = [i.command for i in plan.stage("block").items]
    assert any("131072" in c for c in block) and any("decode" in c for c in block)
    for cut in (c for s in plan.stages for c in s.cut):  # everything left out says why
        assert "would not fit" in cut["reason"] or "needs CUDA" in cut["reason"]


def test_a_small_budget_cuts_items_and_warm_caches_fit_more():
    profile = gpu_check_plan.PROFILES["h100"]
    cold = gpu_check_plan.make_plan(profile).stage("block")
    small = gpu_check_plan.make_plan(profile, scale=0.7).stage("block")
    assert len(small.items) < len(cold.items)
    assert small.estimate_s <= small.budget_s / gpu_check_plan.MARGIN
    assert {c["what"] for c in small.cut} >= {c["what"] for c in cold.cut}
    warm = gpu_check_plan.make_plan(profile, warm=["block"]).stage("block")
    assert len(warm.items) > len(cold.items)  # the kernel comparisons fit once compiled


# -- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--stages", "blocks"], "--stages 'blocks' is not a stage: choose from environment"),
    (["--stage-budget", "block"], "give STAGE=SECONDS with SECONDS > 0"),
    (["--stage-budget", "train=5"], "'train' is not a stage"),
    (["--stage-budget", "block=-1"], "give STAGE=SECONDS with SECONDS > 0"),
    (["--budget-scale", "0"], "--budget-scale 0.0: must be > 0"),
    (["--wheels", "/nonexistent/whl"], "--wheels /nonexistent/whl is not a folder"),
    (["--gpu", "a100"], "invalid choice: 'a100'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    code, out, err = run_main(gpu_check.main, argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_bad_report_folders_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "report"
    a_file.write_text("not a folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for out, message in ((a_file, "is a file: give a folder"),
                         (a_file / "sub", "cannot be created"),
                         (other, "holds other files (notes.txt)")):
        code, _, _ = run_main(gpu_check.main, ["--dry", "--out", str(out)], capsys)
        assert isinstance(code, str) and code.count("\n") == 0 and message in code, code
    assert a_file.read_text() == "not a folder" and (other / "notes.txt").read_text() == "mine"


# -- stage bodies in this process -----------------------------------------------------------


def test_wheel_install_goes_through_gpu_wheels(tmp_path, monkeypatch):
    calls = []

    class FakeWheels:
        @staticmethod
        def install(wheel_dir: Path, target: Path) -> list[str]:
            calls.append((wheel_dir, target))
            if wheel_dir.name == "broken":
                raise RuntimeError("pip failed on tyro-1.0.wheel: rerun make gpu-wheels")
            return ["torchtitan", "tyro"]

    monkeypatch.setitem(sys.modules, "gpu_wheels", FakeWheels)
    spec = dict(wheels=str(tmp_path / "whl"), target=str(tmp_path / "target"))
    assert "no wheel folder at" in environment.install_wheels(spec)["skipped"] and not calls
    (tmp_path / "whl").mkdir()
    assert environment.install_wheels(spec)["installed"] == ["torchtitan", "tyro"]
    assert calls == [(tmp_path / "whl", tmp_path / "target")]
    (tmp_path / "broken").mkdir()
    broken = environment.install_wheels(dict(spec, wheels=str(tmp_path / "broken")))
    assert broken["error"] == "RuntimeError: pip failed on tyro-1.0.wheel: rerun make gpu-wheels"


def test_capabilities_name_what_is_missing():
    caps = environment.capabilities(
        dict(available=False), "2.11.0", dict(torchtitan="0.2.2", tyro="not importable (x)"),
        {"flex_attention(kernel_options)": None, "BlockMask.from_kv_blocks(seq_lengths)":
         "missing"}, {"rat_plugin.ops": None})
    assert caps["gpu"].startswith("no CUDA GPU visible")
    assert caps["package:torchtitan"] is None and caps["package:tyro"] == "not importable (x)"
    assert caps["api:BlockMask.from_kv_blocks(seq_lengths)"] == (
        "torch 2.11.0 lacks BlockMask.from_kv_blocks(seq_lengths) (missing): needs a newer torch")
    training = next(s for s in gpu_check.STAGES if s.name == "training")
    assert gpu_check.missing(training, dict(capabilities=caps), dry=True) == \
        "package:tyro: not importable (x)"
    assert gpu_check.missing(training, dict(capabilities=caps), dry=False).startswith("gpu: ")


def test_outcomes_record_pass_fail_skip_and_error(tmp_path):
    """The correctness stage's per-test records, against a file of known outcomes."""
    (tmp_path / "test_known.py").write_text(
        "import pytest\n"
        "@pytest.fixture\n"
        "def broken():\n    raise RuntimeError('fixture broke')\n"
        "def test_passes():\n    pass\n"
        "def test_fails():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skipif(True, reason='needs CUDA')\n"
        "def test_skips():\n    pass\n"
        "def test_errors(broken):\n    pass\n")
    seen = []
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(tmp_path / "test_known.py")],
                       plugins=[correctness.Outcomes(seen.append)])
    assert code == pytest.ExitCode.TESTS_FAILED
    got = {t["id"].split("::")[1]: (t["outcome"], t["message"]) for t in seen}
    assert got["test_passes"] == ("passed", None)
    assert got["test_fails"][0] == "failed" and "one is not two" in got["test_fails"][1]
    assert got["test_skips"] == ("skipped", "needs CUDA")
    assert got["test_errors"][0] == "error" and "fixture broke" in got["test_errors"][1]


# -- the runner over stand-in stages --------------------------------------------------------

STAND_IN = """
import os, sys, time
from gpu_check_stages._stage import main

def run(spec, recorder):
    name = spec["stage"]
    if name == "environment":
        recorder.data["results"].update(
            gpu=dict(available=False), versions=dict(torch="2.11.0"),
            capabilities={"gpu": None, "package:torchtitan": "not importable (stand-in)"})
        return None
    recorder.run_items(spec["items"][:1], lambda item: iter([dict(ms=1.5)]))
    if name == os.environ["STAND_IN_SLEEPS"]:
        open(os.environ["STAND_IN_PID"], "w").write(str(os.getpid()))
        time.sleep(300)
    return None

main(run)
"""
DRIVER = """
import sys
sys.path.insert(0, {tools!r})
import gpu_check

class StandIn(gpu_check.Stage):
    @property
    def module(self):
        return "stand_in_stage"

gpu_check.STAGES = tuple(StandIn(s.name, s.needs) for s in gpu_check.STAGES)
sys.exit(gpu_check.main(sys.argv[1:]))
"""


def start_stand_ins(tmp_path, sleeps: str, *argv: str) -> subprocess.Popen:
    """The runner over stand-in stages (``--dry`` unless ``argv`` starts with --gpu)."""
    (tmp_path / "stand_in_stage.py").write_text(STAND_IN)
    (tmp_path / "driver.py").write_text(DRIVER.format(tools=str(REPO / "tools")))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", STAND_IN_SLEEPS=sleeps,
               STAND_IN_PID=str(tmp_path / "pid"))
    mode = [] if argv[:1] == ("--gpu",) else ["--dry"]
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), *mode, "--out",
                             str(tmp_path / "out"), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_report(out: Path) -> tuple[dict, dict]:
    report = json.loads((out / "gpu_check.json").read_text())
    return report, {s["name"]: s for s in report["stages"]}


def wait_for(pid_file: Path, run: subprocess.Popen) -> None:
    """Until the stand-in stage that sleeps has written its pid (it has recorded by then)."""
    for _ in range(600):
        if pid_file.exists():
            return
        time.sleep(0.1)
    run.kill()
    pytest.fail(run.communicate()[0])


def assert_gone(pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"stage process {pid} still runs")


@pytest.mark.slow  # the runner and its stage processes
def test_a_stage_killed_at_its_budget_is_reported_and_the_next_ones_run(tmp_path):
    run = start_stand_ins(tmp_path, "block", "--stage-budget", "block=3")
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 1, out
    report, stages = read_report(tmp_path / "out")
    assert report["state"] == "complete"
    block = stages["block"]
    assert block["status"] == "timeout" and block["reason"].startswith(
        "cut at its budget of 3 s"), block["reason"]
    assert 3 <= block["duration_s"] < 3 + 2 * gpu_check.KILL_GRACE_S + 5
    assert block["items"][0]["records"] == [dict(ms=1.5)]  # measured before the cut: kept
    assert_gone(tmp_path / "pid")
    assert [stages[n]["status"] for n in ("environment", "correctness", "generation")] == \
        ["ok"] * 3
    assert stages["training"]["status"] == "skipped"
    assert stages["training"]["reason"] == "package:torchtitan: not importable (stand-in)"
    assert report["environment"]["runnable"]["training"] == stages["training"]["reason"]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## block: timeout" in md and "cut at its budget of 3 s" in md
    planned = [i["what"] for i in report["plan"]["stages"][STAGES.index("block")]["items"]]
    for what in planned[1:]:  # the stand-in ran the first, then slept until the cut
        assert f"- not run: {what} (planned" in md


@pytest.mark.slow  # the runner and its stage processes
def test_a_completed_stage_warms_the_next_plan(tmp_path, capsys):
    cache = tmp_path / "cache"
    run = start_stand_ins(tmp_path, "none", "--gpu", "h100", "--cache-dir", str(cache),
                          "--stages", "environment", "correctness")
    out, _ = run.communicate(timeout=120)
    report, stages = read_report(tmp_path / "out")
    assert stages["correctness"]["status"] == "ok", out
    assert stages["block"]["reason"] == "not selected (--stages)"
    assert run.returncode == 0  # every selected stage ok
    assert json.loads((cache / "warm.json").read_text()) == ["correctness"]
    code, text, _ = run_main(gpu_check.main, ["--plan", "--gpu", "h100", "--cache-dir",
                                              str(cache)], capsys)
    assert code == 0 and "warm caches: correctness" in text


@pytest.mark.slow  # the runner and its stage processes
def test_a_stopped_run_leaves_a_report_that_says_where(tmp_path):
    run = start_stand_ins(tmp_path, "generation")
    out = tmp_path / "out"
    wait_for(tmp_path / "pid", run)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 1
    report, stages = read_report(out)
    assert report["state"] == "stopped" and report["finished"]
    assert stages["generation"]["status"] == "timeout"
    assert "stopped (SIGTERM)" in stages["generation"]["reason"]
    assert stages["generation"]["items"][0]["records"] == [dict(ms=1.5)]
    assert stages["training"]["status"] == "skipped"
    assert [stages[n]["status"] for n in ("environment", "correctness", "block")] == ["ok"] * 3
    assert_gone(tmp_path / "pid")


@pytest.mark.slow  # the runner and its stage processes
def test_a_killed_runner_takes_its_stage_along_and_its_report_says_where(tmp_path):
    run = start_stand_ins(tmp_path, "correctness")
    wait_for(tmp_path / "pid", run)
    time.sleep(2 * gpu_check.POLL_S)  # the runner merges the stage's record
    run.kill()  # SIGKILL: no handler runs
    run.wait(timeout=60)
    assert_gone(tmp_path / "pid")  # the stage died with its runner
    report, stages = read_report(tmp_path / "out")
    assert report["state"] == "running" and report["finished"] is None
    assert stages["correctness"]["status"] == "running"
    assert stages["correctness"]["items"][0]["records"] == [dict(ms=1.5)]
    assert "it was killed while the stage marked running ran" in (
        tmp_path / "out" / "gpu_check.md").read_text()


# -- the dry run: every real stage -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the stages run")
def test_without_a_gpu_every_gpu_stage_is_skipped_with_the_reason(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--gpu", "h100", "--cache-dir",
                           str(tmp_path / "cache")]) == 1
    report, stages = read_report(tmp_path / "out")
    assert stages["environment"]["status"] == "ok" and report["state"] == "complete"
    for name in STAGES[1:]:
        assert stages[name]["status"] == "skipped"
        assert stages[name]["reason"].startswith("gpu: no CUDA GPU visible"), stages[name]
        assert "make gpu-check DRY=1" in stages[name]["reason"]


def check_schema(report: dict) -> None:
    assert (report["schema"], report["version"]) == ("rat-titan.gpu_check", 1)
    assert report["state"] == "complete" and report["dry"] is True
    assert [s["name"] for s in report["stages"]] == STAGES
    assert [s["name"] for s in report["plan"]["stages"]] == STAGES
    for stage in report["stages"]:
        assert stage["status"] in gpu_check_report_statuses()
        assert isinstance(stage["duration_s"], float) and stage["duration_s"] > 0
        assert isinstance(stage["budget_s"], (int, float)) and stage["reason"] is None
        for item in stage["items"]:
            assert isinstance(item["command"], str) and item["status"] == "ok"
            assert isinstance(item["seconds"], float) and isinstance(item["records"], list)
        for table in stage["tables"]:
            assert table["title"] and table["markdown"].startswith("|")


def gpu_check_report_statuses():
    import gpu_check_report

    return gpu_check_report.STATUSES


@pytest.mark.slow
def test_dry_run_makes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    run = subprocess.run(["make", "gpu-check", "DRY=1", f"OUT={out}",
                          f"GPU_CHECK_PYTHON={sys.executable}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = list(out.iterdir())
    assert len(files) <= LIMIT_FILES and all(f.stat().st_size <= LIMIT_BYTES for f in files)
    report, stages = read_report(out)
    check_schema(report)
    assert all(s["status"] == "ok" for s in report["stages"]), [
        (s["name"], s["reason"]) for s in report["stages"]]

    env = report["environment"]
    assert env["versions"]["torch"].startswith("2.") and env["gpu"] == dict(available=False)
    needed = {need for stage in gpu_check.STAGES for need in stage.needs} - {"gpu"}
    assert needed <= set(env["capabilities"])
    assert all(env["capabilities"][need] is None for need in needed)
    assert set(env["runnable"]) == set(STAGES[1:])

    tests = stages["correctness"]["items"][0]["records"]
    assert tests and all(t["outcome"] == "skipped" for t in tests)  # the CUDA tests, on CPU
    names = {t["id"].split("::")[1].split("[")[0] for t in tests}
    assert {"test_compiled_bf16_mixing_on_cuda_matches_eager_portable",  # bf16 vs portable
            "test_custom_op_registration_on_cuda",  # opcheck
            "test_matches_portable_scan",  # Triton kernels
            "test_cuda_graph_generation_equals_eager", "test_cuda_decode_step_never_syncs",
            "test_window_attention_matches_portable"} <= names  # compiled flex, cuda case
    ids = {t["id"] for t in tests}
    assert {f"tests/test_triton_scan.py::test_compiled_bf16_mixing_on_cuda_matches_eager_portable"
            f"[{n}]" for n in (64, 300)} <= ids  # below and above flex's 128-token blocks
    assert stages["correctness"]["results"]["counts"]["skipped"] == len(tests)
    assert (out / "correctness.xml").read_text().count("<testcase") == len(tests)

    block = [r for i in stages["block"]["items"] for r in i["records"]]
    assert {r["mixer"] for r in block} == {"attention", "swa64", "rat_L16"}
    assert {r["mode"] for r in block} == {"train", "decode", "prefill"}
    assert all(isinstance(r["ms"], float) and r["ms"] > 0 for r in block)
    settings = [i["params"].get("setting") for i in stages["block"]["items"]]
    assert {"defaults", "flex_bf16", "triton_autotune"} <= set(settings)

    generated = [r for i in stages["generation"]["items"] for r in i["records"]]
    assert {r["throughput"]["kind"] for r in generated} >= {"rat", "rat_attn"}
    assert all(r["throughput"]["total_tokens_per_s"] > 0 for r in generated)

    (trained,) = stages["training"]["items"]
    steps = trained["records"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["tps"] > 0 for s in steps)
    summary = stages["training"]["results"]["summaries"]["rat"]
    assert summary["loss_finite"] and summary["steps"] == 2
    assert "RAT kernels: scan=torch (portable)" in " ".join(stages["training"]["notes"])
    assert {c["what"].split()[1] for c in stages["training"]["cut"]} == {
        "rat_attn", "rat_swa", "rat_attn_swa"}  # cut by the dry run's budget, and said so
    assert "torchtitan.train" in trained["command"] and "MASTER_PORT=" in trained["command"]

    md = (out / "gpu_check.md").read_text()
    for name in STAGES:
        assert f"## {name}: ok" in md
    assert "DRY RUN on CPU" in md and "python3 tools/bench_block.py" in md


def test_the_documented_stage_estimates_are_the_plans():
    doc = (REPO / "docs" / "gpu_fast_path.md").read_text()
    plan = gpu_check_plan.make_plan(gpu_check_plan.PROFILES["h100"])
    for stage in plan.stages:
        row = next(line for line in doc.splitlines() if line.startswith(f"| {stage.name} |"))
        assert row.endswith(f"| {stage.estimate_s:.0f} s / {stage.budget_s:.0f} s |"), row

"""Multi-node jobs on one host: torchrun agents started as the README's SLURM line starts one per
node (``tests/multinode.py``), c10d rendezvous on 127.0.0.1, every process killed by pid at the
end, every launch bounded in time.

- Layouts across 2 nodes (HSDP, FSDP, TP and CP inside a node with data parallelism across) log
  the one-process losses, validation losses and gradient norms from the same seed checkpoint
  (``test_trainer_parallel``'s one-process run, shared). Their data are the debug corpus's first
  quarter four times over, so each data-parallel rank's contiguous shard starts as the corpus
  does: every rank reads the batches the one process reads, and the mean over ranks is the one
  process's loss and gradient. Each rank logs its data-parallel rank (``multinode_faults``).
- Recovery (``--max-restarts=1``, a checkpoint every step): one node's rank SIGKILLed in the
  middle of a step or of a checkpoint save, or the whole node (agent and ranks) killed in the
  middle of a step and a replacement agent started: the job resumes from the newest complete
  checkpoint and logs exactly the losses of the uninterrupted 2-node run, reading the same
  batches.
- A rank that fails in every attempt ends the job, with one line per attempt naming its node and
  rank (``infra/errors.py``); a ConfigError on every node is one line per attempt.
- On the real corpus each node's rank reads its own data-parallel shard: the batches the plugin's
  loader gives that dp rank in-process.
"""

import json
import re
from itertools import islice
from pathlib import Path

import pytest
from torchtitan.config import ConfigManager

from conftest import REPO, tb_losses
from multinode import Job, agent_command, readme_agent_commands
from test_trainer_parallel import CP2, SHAPE, STEPS, TAGS, TP2, Runs

from rat_plugin.infra import ConfigError
from rat_plugin.infra.settings import check_settings

TOLERANCE = 1e-5
# Gradient norms, relative: fp32 norms of the debug model's 1.1M gradient values move by ~1e-5
# with the summation order. The one process's step-1 gradient normed as FSDP's two dim-0 shards
# gives exactly the 2-node norm (2.8253446); its whole-tensor norm (2.8253067) is 2.2e-5 below
# the fp64 norm (2.8253698).
NORM_TOLERANCE = 1e-4
TIMEOUT = 300  # seconds per job: everything it started is killed then
LOGGED = {"training": list(range(1, STEPS + 1)), "validation": [1, STEPS],
          "grad_norm": list(range(1, STEPS + 1))}
TB_TAGS = {**TAGS, "grad_norm": "grad_norm"}
ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?(\w+Error: .*) \[node (\d+) \([^)]*\), rank (\d+), "
                        r"local rank (\d+)\](.*)$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, seed_checkpoint) -> Runs:
    return Runs(tmp_path_factory.mktemp("one_process"), seed_checkpoint)


@pytest.fixture(scope="module")
def quartered_corpus(debug_assets, tmp_path_factory) -> Path:
    """The debug corpus's first quarter four times (training and validation): contiguous shards
    for 1, 2 or 4 data-parallel ranks all start as the whole corpus does."""
    folder = tmp_path_factory.mktemp("quartered_corpus")
    for split in ("train", "validation"):
        lines = (debug_assets / "data" / "rat_debug" / f"{split}.jsonl").read_text().splitlines()
        quarter = lines[: len(lines) // 4]
        (folder / f"{split}.jsonl").write_text("\n".join(quarter * 4) + "\n")
    return folder


def trainer_args(dump: Path, seed: Path, *options: str, corpus: Path | None = None,
                 save: bool = False) -> list[str]:
    data = (f"--training.dataset_path={corpus}", f"--validation.dataset_path={corpus}") \
        if corpus else ()
    checkpoint = ("--checkpoint.interval=1",) if save else ("--checkpoint.load_only",)
    return ["--job.dump_folder", str(dump), *SHAPE, f"--training.steps={STEPS}",
            "--checkpoint.enable", f"--checkpoint.initial_load_path={seed}", *checkpoint,
            "--experimental.custom_import=multinode_faults", *data, *options]


def run_job(folder: Path, args: list[str], *, nproc: int, replicate: int | None = None,
            fault: str = "", node_down=None, config: str = "rat_debug.toml"
            ) -> tuple[list[int], str, Path]:
    """(each agent's exit code, all agents' output, the ranks' batch log folder)."""
    log = folder / "batches"
    log.mkdir(parents=True)
    with Job(folder, nnodes=2, nproc=nproc, trainer_args=args, replicate=replicate,
             config=config, env={"RAT_TEST_LOG": str(log), "RAT_TEST_FAULT": fault},
             stagger=node_down is not None) as job:
        if node_down is not None:
            node_down(job, log)
        codes = job.wait(TIMEOUT)
    assert job.alive() == []
    return codes, "\n".join(job.output(i) for i in range(len(job.agents))), log


def batches(log: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(log.glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]


def logged(dump: Path) -> dict[str, dict[int, float]]:
    return {kind: tb_losses(dump, tag) for kind, tag in TB_TAGS.items()}


def error_lines(output: str) -> list[re.Match]:
    """The lines the ranks' one-line errors printed (infra/errors.py)."""
    return [m for m in map(ERROR_LINE.match, output.splitlines()) if m]


RAT, RAT_SWA = "rat_debug.toml", "rat_swa_debug.toml"
# name -> (config, ranks per node, data_parallel_replicate_degree, options, torchtitan's mesh)
LAYOUTS = {
    "2x1-fsdp-across-nodes": (RAT, 1, 1, (), "dp_replicate=1, dp_shard=2, cp=1, tp=1"),
    "2x2-hsdp": (RAT, 2, None, (), "dp_replicate=2, dp_shard=2, cp=1, tp=1"),  # README's line
    "2x2-tp2-in-node-fsdp-across": (RAT, 2, 1, (TP2,), "dp_replicate=1, dp_shard=2, cp=1, tp=2"),
    # RAT-SWA: the RAT summaries' and the SWA halo's exchanges (and its layout cache)
    "2x2-cp2-in-node-hsdp-across": (RAT_SWA, 2, 2, (CP2,),
                                    "dp_replicate=2, dp_shard=1, cp=2, tp=1"),
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, seed_checkpoint, quartered_corpus):
    """Each layout's job, run once: (logged values, batch records)."""
    root = tmp_path_factory.mktemp("layouts")
    done = {}

    def run(name: str):
        if name not in done:
            config, nproc, replicate, options, mesh = LAYOUTS[name]
            dump = root / name
            codes, output, log = run_job(
                dump, trainer_args(dump, seed_checkpoint(config), *options,
                                   corpus=quartered_corpus),
                nproc=nproc, replicate=replicate, config=config)
            assert codes == [0, 0], output[-4000:]
            assert f"Building device mesh with parallelism: pp=1, {mesh}" in output
            values = logged(dump)
            assert {kind: sorted(v) for kind, v in values.items()} == LOGGED
            done[name] = values, batches(log)
        return done[name]

    return run


def test_the_readme_commands_are_one_agent_command():
    """The plain multi-node line and the SLURM line start the same agent (tests run the SLURM
    one); only the host, port, job id and sizes change."""
    lines = readme_agent_commands()
    (env, argv), other = [agent_command(c, nnodes=2, nproc=2, port=29500, run_id="r")
                          for c in lines.values()]
    assert (env, argv) == other, lines
    assert "--rdzv_backend=c10d" in argv and "--max-restarts=1" in argv
    # torch 2.13 keeps the agent's store across restarts; gloo then reads the last attempt's
    # addresses and fails to connect (test_a_config_error_on_every_rank_...: attempt 2)
    assert env == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_across_nodes_logs_the_one_process_run(name, layout_runs, runs):
    config, nproc, _, options, _ = LAYOUTS[name]
    want = runs.reference(config)
    got, records = layout_runs(name)
    for kind in TAGS:
        worst = max(abs(got[kind][s] - want[kind][s]) for s in want[kind])
        assert worst <= TOLERANCE, f"{kind} {got[kind]} vs one process {want[kind]}: {worst:.1e}"
    norms, want_norms = got["grad_norm"], want["grad_norm"]
    worst = max(abs(norms[s] / want_norms[s] - 1) for s in want_norms)
    assert worst <= NORM_TOLERANCE, f"gradient norms {norms} vs one process {want_norms}"
    # The data-parallel rank each rank read its shard as: global, across nodes.
    model_parallel = 2 if options else 1  # TP 2 or CP 2 inside a node
    ranks = {(r["node"], r["local_rank"]): (r["dp_rank"], r["dp_degree"]) for r in records}
    assert ranks == {(n, l): ((n * nproc + l) // model_parallel, 2 * nproc // model_parallel)
                     for n in range(2) for l in range(nproc)}


def one_line_per_failure(output: str, attempts: int, at_least: int | None = None
                         ) -> list[re.Match]:
    """The ranks' error lines: one per attempt (``at_least`` where a rank may be stopped by
    torchrun's restart before it can print)."""
    lines = error_lines(output)
    assert (attempts if at_least is None else at_least) <= len(lines) <= attempts, output[-6000:]
    return lines


def kill_node_when_paused(job: Job, log: Path) -> None:
    """The node-1 rank paused in step 3: kill its agent and ranks, start a replacement agent."""
    job.wait_for(log / "paused", TIMEOUT)
    (node,) = {r.agent for r in job.ranks() if r.node == 1}
    job.kill_agent(node)
    job.start_agent()


# name -> (RAT_TEST_FAULT for multinode_faults, what the test does while the job runs)
FAULTS = {
    "rank-killed-mid-step": ("kill:step:3:1:0", None),
    "rank-killed-mid-save": ("kill:save:3:1:0", None),
    "node-killed-mid-step-and-replaced": ("pause:step:3:1:0", kill_node_when_paused),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_job_resumes_the_loss_curve_exactly(fault, layout_runs, seed_checkpoint,
                                            quartered_corpus, tmp_path):
    want, want_batches = layout_runs("2x1-fsdp-across-nodes")
    dump = tmp_path / "job"
    action, node_down = FAULTS[fault]
    codes, output, log = run_job(
        dump, trainer_args(dump, seed_checkpoint("rat_debug.toml"), corpus=quartered_corpus,
                           save=True),
        nproc=1, replicate=1, fault=action, node_down=node_down)
    killed = [-9] if node_down else []  # the agent of the node that went down
    assert sorted(codes) == sorted([0, 0, *killed]), output[-6000:]
    assert (log / "fired").exists() or (log / "paused").exists()
    assert "Training starts at step 3" in output, output[-6000:]  # from step-2, the newest sound
    if fault == "rank-killed-mid-save":
        assert re.search(r"checkpoint: skipping \S*step-3: no .metadata", output), output[-6000:]
    # The survivor's line (the killed rank printed nothing) says a peer died; torchrun may stop
    # the survivor for the restart before its collective fails.
    for line in one_line_per_failure(output, attempts=1, at_least=0):
        assert line.group(3, 4) == ("0", "0") and "a peer rank died first" in line[6], line[0]
    assert logged(dump) == want  # exactly
    # Each node read steps 1-3, then from the resumed data position 3-4: the same batches.
    reads = [((b["node"], b["step"]), b["input"]) for b in batches(log)]
    assert sorted(key for key, _ in reads) == sorted(
        (node, step) for node in range(2) for step in (1, 2, 3, 3, 4))
    want_reads = {(b["node"], b["step"]): b["input"] for b in want_batches}
    assert all(want_reads[key] == read for key, read in reads)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rank_failing_in_every_attempt_ends_the_job_with_one_line(seed_checkpoint, tmp_path,
                                                                    monkeypatch):
    """Node 1's rank raises at step 2 in both attempts: one line per attempt names it. The run
    reads the real corpus: each node's rank reads its own data-parallel shard, the batches the
    plugin's loader gives its dp rank in-process."""
    dump = tmp_path / "job"
    codes, output, log = run_job(dump, trainer_args(dump, seed_checkpoint("rat_debug.toml")),
                                 nproc=1, replicate=1, fault="raise:step:2:1:0")
    assert all(code != 0 for code in codes), output[-6000:]
    lines = one_line_per_failure(output, attempts=2)
    for line in lines:
        assert line.group(2) == "RuntimeError: injected fault at the step of step 2", line[0]
        assert line.group(3, 4, 5) == ("1", "1", "0"), line[0]
        traceback = Path(line[6].removeprefix("; traceback in "))
        assert "raise RuntimeError(f\"injected fault" in json.loads(traceback.read_text())[
            "message"]["extraInfo"]["py_callstack"], line[0]
    records = batches(log)
    assert {(b["node"], b["dp_rank"], b["dp_degree"]) for b in records} == {(0, 0, 2), (1, 1, 2)}
    monkeypatch.chdir(REPO)
    expected = expected_reads(dp_degree=2, steps=2)
    assert sorted((b["dp_rank"], b["step"]) for b in records) == sorted([*expected] * 2)
    assert all(expected[b["dp_rank"], b["step"]] == b["input"] for b in records)


def expected_reads(dp_degree: int, steps: int) -> dict[tuple[int, int], str]:
    """(dp rank, step) -> hash of the batch the plugin's loader gives that rank, in-process."""
    import hashlib

    import rat_plugin.train_spec as ts

    job = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs" /
                                                               "rat_debug.toml"), *SHAPE])
    reads = {}
    for dp_rank in range(dp_degree):
        loader = ts.build_dataloader(dp_world_size=dp_degree, dp_rank=dp_rank,
                                     tokenizer=ts.build_tokenizer(job), job_config=job)
        for step, (inputs, _) in enumerate(islice(loader, steps), start=1):
            reads[dp_rank, step] = hashlib.sha1(inputs["input"].numpy().tobytes()).hexdigest()
    return reads


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_config_error_on_every_node_is_one_line(tmp_path):
    """Refused as the plugin is imported, before the process group (and, under the README's
    launch, the job's store) exists: rank 0 says it for the job."""
    codes, output, _ = run_job(tmp_path / "job", ["--job.dump_folder", str(tmp_path / "job"),
                                                  "--parallelism.pipeline_parallel_degree=2"],
                               nproc=1)
    assert all(code != 0 for code in codes), output[-6000:]
    # --max-restarts=1: it runs twice. Node 1's failure may restart the job before rank 0 gets
    # to it; the last attempt, which nothing restarts, always has its line.
    for line in one_line_per_failure(output, attempts=2, at_least=1):
        assert line.group(2).startswith("ConfigError: [parallelism] pipeline_parallel_degree=2"
                                        ": RAT models have no pipeline plan"), line[0]
        assert line.group(3, 4) == ("0", "0"), line[0]
    # torchrun's report (the last attempt's; node 1's agent may end first, without one when the
    # head's agent, which holds the rendezvous, is gone) gives it once, then a pointer
    report = [l.split("traceback : ", 1)[1] for l in output.splitlines() if "traceback : " in l]
    assert report and sum("pipeline_parallel_degree" in r for r in report) <= 1, output[-6000:]
    assert all(r.startswith("ConfigError") for r in report), report
    assert "c10d::TCPStore::TCPStore(" not in output, output[-6000:]  # no store: none asked


def test_loader_workers_are_refused_as_they_repeat_batches(debug_assets, monkeypatch):
    """torchtitan's text loader hands each of its workers the rank's whole share: with 2 workers
    every batch comes twice. The plugin refuses num_workers > 0 in one line."""
    import rat_plugin.train_spec as ts

    monkeypatch.chdir(REPO)
    job = ConfigManager().parse_args([
        "--job.config_file", str(REPO / "train_configs" / "rat_debug.toml"), *SHAPE,
        "--training.dataloader.num_workers=2"])
    loader = ts.build_dataloader(dp_world_size=1, dp_rank=0, tokenizer=ts.build_tokenizer(job),
                                 job_config=job)
    inputs = [batch["input"] for batch, _ in islice(loader, 4)]
    assert inputs[0].equal(inputs[1]) and inputs[2].equal(inputs[3])
    assert not inputs[0].equal(inputs[2])
    with pytest.raises(ConfigError, match=r"^\[training.dataloader\] num_workers=2: the text "
                       r"datasets give every loader worker .* set num_workers = 0$"):
        check_settings(job, "rat", 16)
    job = ConfigManager().parse_args([
        "--job.config_file", str(REPO / "train_configs" / "rat_debug.toml"),
        "--validation.dataloader.num_workers=1"])
    with pytest.raises(ConfigError, match=r"^\[validation.dataloader\] num_workers=1"):
        check_settings(job, "rat", 16)


def test_the_first_failure_of_an_attempt_prints_the_one_line(tmp_path, monkeypatch, capsys):
    """infra/errors.py in-process, against a real TCP store: the first failing rank prints its
    line, a later one nothing (its torchrun error file points to the first); a claim older than
    this process is an earlier attempt's; a lost peer is said to be one."""
    import time

    import torch.distributed as dist

    from rat_plugin.infra import errors

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    error_file = tmp_path / "error.json"
    monkeypatch.setattr(errors, "_STARTED", time.time())
    env = {"TORCHELASTIC_RUN_ID": "job", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_ERROR_FILE": str(error_file)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def fail(node, rank, exc):
        for name, value in (("GROUP_RANK", node), ("RANK", rank), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(name, value)
        errors.report(type(exc), exc, None, previous=None)
        recorded = json.loads(error_file.read_text())["message"]["message"] \
            if error_file.exists() else None
        return capsys.readouterr().err, recorded

    bad = ConfigError("[training] max_norm=0.0: ...")
    assert fail("1", "3", bad) == (
        "ConfigError: [training] max_norm=0.0: ... [node 1 (%s), rank 3, local rank 0]\n"
        % errors.socket.gethostname(),
        "ConfigError: [training] max_norm=0.0: ... [node 1 (%s), rank 3, local rank 0]"
        % errors.socket.gethostname())
    assert fail("0", "0", bad) == ("", "the same error as node 1, rank 3")
    lost = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1455\nmore")
    assert fail("0", "1", lost) == ("", "RuntimeError: [pair.cc:553] Connection closed by peer "
                                        "[127.0.0.1]:1455 (after the job's first failure, on "
                                        "node 1, rank 3)")
    monkeypatch.setattr(errors, "_STARTED", time.time() + 1)  # a process of the next attempt
    printed, _ = fail("0", "1", lost)
    assert printed.startswith("RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]"
                              ":1455 [node 0 (") and printed.endswith(
        "rank 1, local rank 0]; a peer rank died first without a Python error (killed, out of "
        "memory, a crash): torchrun's log names it and its exit code\n"), printed


def test_restarts_on_the_agents_store_are_warned_of(monkeypatch, caplog):
    """torchrun's default lends its agent's store to the ranks for good (a restart can then dial
    the last attempt's addresses): rank 0 warns when restarts are on; the README's launch, with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, gives the ranks no agent store, and no warning."""
    from rat_plugin.infra.job import check_restarts

    for name, value in (("RANK", "0"), ("TORCHELASTIC_MAX_RESTARTS", "1"),
                        ("TORCHELASTIC_USE_AGENT_STORE", "True")):
        monkeypatch.setenv(name, value)
    with caplog.at_level("WARNING"):
        check_restarts()
    assert "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
    caplog.clear()
    for env in ({"TORCHELASTIC_USE_AGENT_STORE": "False"}, {"TORCHELASTIC_MAX_RESTARTS": "0"}):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with caplog.at_level("WARNING"):
                check_restarts()
    assert caplog.text == ""

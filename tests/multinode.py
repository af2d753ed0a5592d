"""Several torchrun agents on this host as the nodes of one job (c10d rendezvous on 127.0.0.1).

Each agent runs the README's SLURM line (``srun torchrun ...`` of "Training the 1.3B model",
with its ``export``) with only the host, the port, the job id and the sizes changed, as ``python
-m torch.distributed.run`` (what ``torchrun`` is), in a session of its own. The first agent
starts first; with ``stagger`` it hosts the rendezvous store before the others start, as the
head node does under SLURM (a test that kills a node must not kill the head's agent). torchrun
starts each rank in a session of its own, so a watcher thread records every process below every
agent (pid and start time), and ``close`` kills each of them by pid, and each agent's process
group: nothing is found or killed by name. Every wait is bounded.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def readme_block_after(marker: str) -> str:
    """The first ```bash block after the line ``marker`` in the README, continuations joined."""
    text = (REPO / "README.md").read_text()
    start = text.index(marker)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    return block.replace("\\\n", " ")


def readme_agent_commands() -> dict[str, str]:
    """The README's command for one node of a multi-node job, plain and under SLURM (its
    ``export`` lines as assignments before the ``srun`` line's command)."""
    slurm = readme_block_after("SLURM:").splitlines()
    exports = [line.split("#")[0].removeprefix("export ").strip() for line in slurm
               if line.startswith("export ")]
    srun = next(line for line in slurm if line.startswith("srun "))
    return {"multi-node": readme_block_after("Multi-node (run on every node").strip(),
            "slurm": " ".join([*exports, srun.removeprefix("srun ").strip()])}


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def agent_command(command: str, *, nnodes: int, nproc: int, port: int, run_id: str,
                  config: str = "rat_debug.toml", replicate: int | None = None
                  ) -> tuple[dict[str, str], list[str]]:
    """(environment, argv) of ``command`` (a README line) for this host: its shell variables
    filled in, then the host, sizes and config replaced; every other word stays. Each
    replaced option must be in ``command`` once."""
    filled = Template(command).safe_substitute(
        SLURM_NNODES=nnodes, SLURM_JOB_ID=run_id, head="127.0.0.1", HEAD_NODE="127.0.0.1")
    words = shlex.split(filled)
    env = {}
    while ASSIGNMENT.match(words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == "torchrun", words
    new = {"--nnodes": nnodes, "--nproc_per_node": nproc, "--rdzv_id": run_id,
           "--rdzv_endpoint": f"127.0.0.1:{port}",
           "--job.config_file": f"train_configs/{config}",
           "--parallelism.data_parallel_replicate_degree": nnodes if replicate is None
           else replicate}
    for option, value in new.items():
        at = [i for i, word in enumerate(words) if word.split("=", 1)[0] == option]
        assert len(at) == 1, f"{option} is not once in the README's {command!r}"
        i = at[0]
        if "=" in words[i]:
            words[i] = f"{option}={value}"
        else:
            words[i + 1] = str(value)
    return env, [sys.executable, "-m", "torch.distributed.run", *words[1:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether a socket on this host listens on ``port`` (read from /proc: no connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return True
    return False


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


@dataclass(frozen=True)
class Rank:
    pid: int
    agent: int  # index of the agent (harness order) that started it
    node: int  # torchrun's GROUP_RANK
    rank: int
    local_rank: int
    attempt: int  # TORCHELASTIC_RESTART_COUNT


class Job:
    """One torchrun job of ``nnodes`` agents on this host; use as a context manager."""

    def __init__(self, folder: Path, *, nnodes: int, nproc: int, trainer_args: list[str],
                 command: str = "slurm", replicate: int | None = None,
                 env: dict[str, str] | None = None, config: str = "rat_debug.toml",
                 stagger: bool = False):
        self.folder = folder
        self.stagger = stagger
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        run_id = f"rat-test-{self.port}"
        readme_env, argv = agent_command(readme_agent_commands()[command], nnodes=nnodes,
                                         nproc=nproc, port=self.port, run_id=run_id,
                                         config=config, replicate=replicate)
        self.argv = [*argv, *trainer_args]
        path = os.pathsep.join(p for p in (str(TESTS), str(REPO), os.environ.get("PYTHONPATH"))
                               if p)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **readme_env,
                    **(env or {})}
        self.nnodes = nnodes
        self.agents: list[subprocess.Popen] = []
        self._seen: dict[int, tuple[str, int]] = {}  # pid -> (start time, agent index)
        self._ranks: dict[int, Rank] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # ------------------------------------------------------------------ processes
    def start(self, timeout: float = 120) -> "Job":
        """Start every agent. With ``stagger`` the others wait until the first hosts the
        rendezvous store, as a head node does (all at once, any of them may host it)."""
        self._watcher.start()
        self.start_agent()
        deadline = time.monotonic() + timeout
        while self.stagger and not listening(self.port):
            if self.agents[0].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the first agent never listened on {self.port}:\n"
                                     + self.output(0)[-3000:])
            time.sleep(0.1)
        for _ in range(1, self.nnodes):
            self.start_agent()
        return self

    def start_agent(self) -> subprocess.Popen:
        """One more agent (the first ones, or a replacement), logging to agent<i>.log."""
        index = len(self.agents)
        log = open(self.folder / f"agent{index}.log", "w")
        agent = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        with self._lock:
            self.agents.append(agent)
            self._seen[agent.pid] = (_start_time(agent.pid), index)
        return agent

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._poll()
            time.sleep(0.1)

    def _poll(self) -> None:
        with self._lock:
            for index, agent in enumerate(self.agents):
                stack = [agent.pid]
                while stack:
                    parent = stack.pop()
                    for pid in _children(parent):
                        stack.append(pid)
                        if pid in self._seen:
                            continue
                        self._seen[pid] = (_start_time(pid), index)
                        env = _environ(pid)
                        if parent == agent.pid and "GROUP_RANK" in env:
                            self._ranks[pid] = Rank(
                                pid, index, int(env["GROUP_RANK"]), int(env["RANK"]),
                                int(env["LOCAL_RANK"]), int(env["TORCHELASTIC_RESTART_COUNT"]))

    def ranks(self) -> list[Rank]:
        """Every rank started so far (alive or not)."""
        self._poll()
        with self._lock:
            return sorted(self._ranks.values(), key=lambda r: r.pid)

    def _kill(self, pids) -> None:
        for pid in pids:
            start, _ = self._seen[pid]
            if start is not None and _start_time(pid) == start:  # not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kill_agent(self, index: int) -> None:
        """SIGKILL agent ``index`` and every process it started: a node going down."""
        self._poll()
        with self._lock:
            self._kill([pid for pid, (_, i) in self._seen.items() if i == index])
        self.agents[index].wait(timeout=30)

    def wait(self, timeout: float) -> list[int]:
        """Every agent's exit code; on timeout, kill everything and fail with the logs."""
        deadline = time.monotonic() + timeout
        codes = []
        for index, agent in enumerate(self.agents):
            try:
                codes.append(agent.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.close()
                raise AssertionError(f"the job ran past {timeout} s; agent {index} log:\n"
                                     + self.output(index)[-3000:]) from None
        return codes

    def wait_for(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline or all(a.poll() is not None for a in self.agents):
                self.close()
                raise AssertionError(f"{path} never appeared; agent logs:\n"
                                     + "\n".join(self.output(i)[-2000:]
                                                 for i in range(len(self.agents))))
            time.sleep(0.1)

    def output(self, index: int) -> str:
        return (self.folder / f"agent{index}.log").read_text(errors="replace")

    def close(self) -> None:
        """Kill every process this job started (by pid) and each agent's process group."""
        self._poll()
        self._stop.set()
        with self._lock:
            self._kill(list(self._seen))
            for agent in self.agents:
                if agent.returncode is None:  # not reaped: its group id is still its own
                    try:
                        os.killpg(agent.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        for agent in self.agents:
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def alive(self) -> list[int]:
        """The pids this job started that still run (after close: none)."""
        return [pid for pid, (start, _) in self._seen.items()
                if start is not None and _start_time(pid) == start
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

    def __enter__(self) -> "Job":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

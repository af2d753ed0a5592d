"""Trainer errors as one line, and under torchrun one line per job (per attempt of a restarted
job), however many nodes and ranks fail.

Run alone, an uncaught ConfigError, NonFiniteError or DiskFullError prints as its message, not
a traceback; other exceptions keep Python's traceback.

Under torchrun a failure on one rank makes the others fail too (a collective loses its peer).
The first rank of the job to fail prints one line: the cause (``Type: message``, whatever the
exception) and where, ``[node N (host), rank R, local rank L]``, N being torchrun's
``GROUP_RANK``. A line whose cause is a lost peer says that a rank died first without a Python
error (killed, out of memory, crashed): torchrun logs that rank's exit code. The ranks that fail
after the first print nothing. The first is settled in the job's TCP store (``MASTER_ADDR:
MASTER_PORT``): torchrun's agent holds it, or rank 0 under ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE
=1`` (the README's launch lines; rank 0 starts it with the process group). A claim older than
this process is an earlier attempt's, and is replaced. Without a store: before the process group
exists, rank 0 alone prints (the error is the job's settings, the same on every rank); after,
the store went with rank 0 or its node, which failed first (and said so, or torchrun does), and
no rank prints.

torch's ``@record`` (on torchtitan's ``Trainer.__init__`` and ``train``) writes every escaping
exception with its traceback to the file torchrun names in ``TORCHELASTIC_ERROR_FILE``, and
torchrun's failure report prints that file. The hook runs after ``@record`` and rewrites it:
with the one line for the plugin's errors, and with a short pointer to the first failure for the
ranks that failed after it. The first failure of any other exception keeps its traceback there,
and its line names that file (torchrun keeps it after a restart, when no report is printed).
torchrun's own summary (its traceback and per-rank table) stays: the launcher is torchrun's.
"""

import json
import os
import re
import socket
import sys
import time
from datetime import timedelta

from rat_plugin.infra import ConfigError, DiskFullError, NonFiniteError

ONE_LINE_ERRORS = (ConfigError, NonFiniteError, DiskFullError)
STORE_TIMEOUT = timedelta(seconds=5)
# A collective whose peer process is gone (gloo's and NCCL's words for it).
LOST_PEER = re.compile(r"Connection (reset|closed) by peer|Broken pipe|remote process exited")
PEER_DIED = ("; a peer rank died first without a Python error (killed, out of memory, a crash): "
             "torchrun's log names it and its exit code")


def _process_start() -> float:
    """When this process started (a claim older than that is an earlier attempt's): Linux's
    start time in clock ticks after boot, else now (the plugin is imported at start)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


_STARTED = _process_start()


def cause_line(exc: BaseException) -> str:
    """``Type: message`` on one line (the message's first line, at most 300 characters)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def where() -> dict:
    """This rank's place in the torchrun job."""
    env = os.environ
    return {"node": env.get("GROUP_RANK", "?"), "host": socket.gethostname(),
            "rank": env.get("RANK", "?"), "local_rank": env.get("LOCAL_RANK", "?")}


def located(line: str, place: dict) -> str:
    return (f"{line} [node {place['node']} ({place['host']}), rank {place['rank']}, "
            f"local rank {place['local_rank']}]")


def first_failure(mine: dict, store) -> dict:
    """The job's first failure in this attempt: ``mine`` if no rank claimed one before."""
    key = f"rat_plugin/first_failure/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    ours = json.dumps(mine)
    current = store.compare_set(key, "", ours).decode()
    while current != ours:
        first = json.loads(current)
        if first["time"] >= _STARTED:
            return first
        current = store.compare_set(key, current, ours).decode()  # an earlier attempt's
    return mine


def _job_first_failure(mine: dict) -> dict | None:
    """``first_failure`` in the job's store; None without one (not started or gone)."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and not _dist_started():
        return None  # rank 0 starts the store with the process group
    try:
        socket.create_connection((host, port), timeout=2).close()  # else c10d logs its failure
        store = dist.TCPStore(host, port, is_master=False, timeout=STORE_TIMEOUT)
        return first_failure(mine, store)
    except Exception:  # refused, timed out: the store went with its holder
        return None


def _dist_started() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _record_for_torchrun(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": line, "timestamp": str(int(time.time()))}
    with open(path, "w") as f:
        json.dump({"message": {"message": line, "extraInfo": info}}, f)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_PORT" in os.environ


def report(exc_type, exc, tb, previous) -> None:
    """Print (and record for torchrun) this rank's failure, as the module docstring says."""
    one_line = issubclass(exc_type, ONE_LINE_ERRORS)
    if not _under_torchrun():
        if not one_line:
            return previous(exc_type, exc, tb)
        print(cause_line(exc), file=sys.stderr, flush=True)
        return _record_for_torchrun(cause_line(exc))
    mine = {**where(), "cause": cause_line(exc), "time": time.time()}
    first = _job_first_failure(mine)
    started = _dist_started()
    if first is None and not started and mine["rank"] == "0":
        first = mine  # no store yet: an error every rank meets alike, which rank 0 says
    if first is mine:
        line = located(mine["cause"], mine)
        if not one_line and LOST_PEER.search(str(exc)):
            line += PEER_DIED
        elif not one_line and os.environ.get("TORCHELASTIC_ERROR_FILE"):
            line += f"; traceback in {os.environ['TORCHELASTIC_ERROR_FILE']}"  # @record's
        print(line, file=sys.stderr, flush=True)
        if one_line:
            _record_for_torchrun(line)
    elif first is None and not started:
        _record_for_torchrun(f"{exc_type.__name__}, as rank 0 says (before the job's store)")
    elif first is None:
        _record_for_torchrun(f"{mine['cause']} (the job's store had gone: rank 0 or its node "
                             "failed first)")
    elif first["cause"] == mine["cause"]:
        _record_for_torchrun(f"the same error as node {first['node']}, rank {first['rank']}")
    else:
        _record_for_torchrun(f"{mine['cause']} (after the job's first failure, on node "
                             f"{first['node']}, rank {first['rank']})")


def one_line_excepthook(previous=sys.excepthook):
    def hook(exc_type, exc, tb):
        report(exc_type, exc, tb, previous)

    return hook

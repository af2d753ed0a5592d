"""Test-only trainer hooks of the multi-node tests, never shipped: the ranks load this module with
``--experimental.custom_import=multinode_faults`` (tests/ on PYTHONPATH). It imports the plugin
as its ``custom_import`` would, then wraps two methods:

- ``Trainer.forward_backward_step``: logs each step's batch to ``$RAT_TEST_LOG/rank<R>.jsonl``
  (step, node, local rank, dp rank and degree, a hash of the input ids), then, for a fault
  ``at`` "step", fires after the forward and backward of that step (before the optimizer step,
  so the other ranks are waiting in a collective);
- DCP's ``FileSystemWriter.write_data``: for a fault ``at`` "save", fires after this rank wrote
  its file of that step's checkpoint, before rank 0 can write the ``.metadata`` that completes it.

``RAT_TEST_FAULT="<action>:<at>:<step>:<node>:<local rank>"``, node being torchrun's GROUP_RANK.
Actions: ``kill`` (SIGKILL itself), ``pause`` (create ``$RAT_TEST_LOG/paused`` and sleep, for
the test to kill the whole node), both once per job (the first rank to fire creates
``$RAT_TEST_LOG/fired``); ``raise`` (a RuntimeError, in every attempt).
"""

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import rat_plugin.train_spec  # noqa: F401  (what the TOML's custom_import loads)
from torch.distributed.checkpoint.filesystem import FileSystemWriter

# the trainer runs as ``-m torchtitan.train``: its class is __main__'s (torchtitan.train would be
# a second copy of the module)
Trainer = sys.modules["__main__"].Trainer

LOG = Path(os.environ["RAT_TEST_LOG"])
NODE, LOCAL_RANK, RANK = (int(os.environ[k]) for k in ("GROUP_RANK", "LOCAL_RANK", "RANK"))
_fault = os.environ.get("RAT_TEST_FAULT", "")
ACTION, AT, STEP, FAULT_NODE, FAULT_LOCAL_RANK = (
    _fault.split(":") if _fault else ("", "", "0", "-1", "-1"))


def maybe_fire(at: str, step: int) -> None:
    if (at, step, NODE, LOCAL_RANK) != (AT, int(STEP), int(FAULT_NODE), int(FAULT_LOCAL_RANK)):
        return
    if ACTION == "raise":
        raise RuntimeError(f"injected fault at the {at} of step {step}")
    try:
        os.close(os.open(LOG / "fired", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return  # fired in an earlier attempt
    if ACTION == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    (LOG / "paused").write_text(str(os.getpid()))
    time.sleep(600)  # until the test kills this node


_forward_backward_step = Trainer.forward_backward_step


def forward_backward_step(self, *, input_dict, labels, **kwargs):
    record = {"step": self.step, "node": NODE, "local_rank": LOCAL_RANK,
              "dp_rank": self.dataloader.dp_rank, "dp_degree": self.dataloader.dp_world_size,
              "input": hashlib.sha1(input_dict["input"].cpu().numpy().tobytes()).hexdigest(),
              "attempt": int(os.environ["TORCHELASTIC_RESTART_COUNT"])}
    with open(LOG / f"rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    loss = _forward_backward_step(self, input_dict=input_dict, labels=labels, **kwargs)
    maybe_fire("step", self.step)
    return loss


_write_data = FileSystemWriter.write_data


def write_data(self, plan, planner):
    written = _write_data(self, plan, planner)
    written.wait()
    name = Path(str(self.path)).name
    if name.startswith("step-"):
        maybe_fire("save", int(name.removeprefix("step-")))
    return written


Trainer.forward_backward_step = forward_backward_step
FileSystemWriter.write_data = write_data

"""Runs killed mid-write (``os._exit``: no clean-up runs), leaving what a kill leaves for
``rat_plugin.atomic.recover`` to find."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# argv: WHEN SCRIPT ARGS... Runs SCRIPT as __main__ with ARGS and dies
# - "swap": as its complete new folder is about to be swapped in;
# - "displaced": replacing a folder without exchange, between moving the old folder aside and
#   renaming the new one to the path.
CHILD = r"""
import os, runpy, sys
from pathlib import Path
import rat_plugin.atomic as atomic

when, script, *argv = sys.argv[1:]
if when == "swap":
    atomic._swap_in = lambda tmp, out: os._exit(9)
else:
    atomic.exchange = lambda a, b: False
    replace = os.replace
    def replace_unless_new_folder(a, b):
        if Path(a).name.startswith(f".{Path(b).name}.tmp-"):
            os._exit(9)
        return replace(a, b)
    os.replace = replace_unless_new_folder
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def killed(when: str, script: str | os.PathLike, *argv) -> None:
    """Run ``script`` with ``argv`` in a child killed ``when`` (see CHILD)."""
    run = subprocess.run(
        [sys.executable, "-c", CHILD, when, str(script), *map(str, argv)], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
    )
    assert run.returncode == 9, run.stdout[-2000:] + run.stderr[-2000:]


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))

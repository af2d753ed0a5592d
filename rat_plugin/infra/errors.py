"""Plugin errors as one line: an uncaught ConfigError, NonFiniteError or DiskFullError prints
as its message alone on every rank, and under torchrun the failure report repeats that line
instead of the traceback.

torch's ``@record`` (on torchtitan's ``Trainer.__init__`` and ``train``) writes every escaping
exception with its traceback to the file torchrun names in ``TORCHELASTIC_ERROR_FILE``, and
torchrun's report prints that file. The excepthook runs after ``@record``, so it rewrites the
file with the one line. torchrun's own summary (its traceback and the per-rank table) stays:
the launcher process is torchrun's.
"""

import json
import os
import sys
import time

from rat_plugin.infra import ConfigError, DiskFullError, NonFiniteError

ONE_LINE_ERRORS = (ConfigError, NonFiniteError, DiskFullError)


def _record_for_torchrun(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": line, "timestamp": str(int(time.time()))}
    with open(path, "w") as f:
        json.dump({"message": {"message": line, "extraInfo": info}}, f)


def one_line_excepthook(previous=sys.excepthook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ONE_LINE_ERRORS):
            line = f"{exc_type.__name__}: {exc}"
            print(line, file=sys.stderr, flush=True)
            _record_for_torchrun(line)
        else:
            previous(exc_type, exc, tb)

    return hook

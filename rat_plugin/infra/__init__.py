"""torchtitan integration layer: parallelisms (parallelize.py), CPU/gloo mode (cpu.py), checks
of the launched job (job.py) and one-line errors (errors.py)."""


class ConfigError(ValueError):
    """A bad training configuration; the message is one line naming the setting to fix.

    Under the trainer an uncaught ConfigError prints as that one line, not as a stack trace
    (``rat_plugin.train_spec`` installs the hook of ``errors.py``).
    """


class NonFiniteError(RuntimeError):
    """Training stopped at a non-finite loss or gradient, before the optimizer step (and so
    before any checkpoint of that state); printed as one line like ConfigError."""


class DiskFullError(RuntimeError):
    """A checkpoint save ran out of disk space; printed as one line like ConfigError, naming the
    folder and the space left there (``saving.py``)."""

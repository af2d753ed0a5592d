"""torchtitan integration layer: parallelisms (parallelize.py) and CPU/gloo mode (cpu.py)."""


class ConfigError(ValueError):
    """A bad training configuration; the message is one line naming the setting to fix.

    Under the trainer an uncaught ConfigError prints as that one line, not as a stack trace
    (``rat_plugin.train_spec`` installs the hook).
    """

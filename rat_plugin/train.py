"""``python -m rat_plugin.train --job.config_file X.toml``: torchtitan's trainer with the RAT
plugin loaded. Under torchrun it is the same as ``-m torchtitan.train``; run directly (no
torchrun environment) it trains as a single process.
"""

import os
import socket


def _single_process_env() -> None:
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="localhost", MASTER_PORT=str(port))


def main() -> None:
    _single_process_env()
    import rat_plugin.train_spec  # noqa: F401  (registers the model family)
    from torchtitan.train import Trainer, main as titan_main

    titan_main(Trainer)


if __name__ == "__main__":
    main()

"""Stage 1, environment: install the carried wheels, then describe the node and what it can run.

Installs the wheel folder with ``tools/gpu_wheels.py`` (``--no-index --no-deps`` into the
runner's temporary target, which every later stage has on PYTHONPATH; the node's torch is never
touched), then records the GPU, driver and versions, which packages import, and which torch
APIs of the GPU program exist. Each capability is None when present, else the reason it is
missing; the runner skips the stages that need a missing one, with that reason.
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import subprocess
from pathlib import Path

from gpu_check_stages._stage import Recorder, main, one_line

# Imported (the stages need them to import); then only looked up (the node has them, or they
# are optional).
IMPORTED = ("torchtitan", "torchdata", "datasets", "tyro", "torchao", "pytest")
LOOKED_UP = ("xdist", "pytest_timeout", "transformers", "tokenizers", "flash_attn")
DISTRIBUTIONS = dict(xdist="pytest-xdist", pytest_timeout="pytest-timeout",
                     flash_attn="flash-attn")


def install_wheels(spec: dict) -> dict:
    """The carried wheels installed into the target, or why not."""
    wheel_dir, target = Path(spec["wheels"]), Path(spec["target"])
    if not wheel_dir.is_dir():
        return dict(installed=[], skipped=f"no wheel folder at {wheel_dir}: the packages "
                                          "installed in this Python are used as they are")
    try:
        import gpu_wheels

        return dict(installed=gpu_wheels.install(wheel_dir, target), folder=str(wheel_dir))
    except Exception as error:
        return dict(installed=[], error=one_line(error), folder=str(wheel_dir))


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return dict(available=False)
    props = torch.cuda.get_device_properties(0)
    return dict(available=True, name=props.name, count=torch.cuda.device_count(),
                memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", driver=nvidia_smi("driver_version"))


def nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() \
        else None


def versions() -> dict:
    import torch

    found = dict(python=platform.python_version(), torch=torch.__version__,
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 cpu_cores=os.cpu_count())
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    return found


def packages() -> dict:
    """name -> installed version, or why it is not importable."""
    found = {}
    for name in IMPORTED + LOOKED_UP:
        try:
            if name in IMPORTED:
                importlib.import_module(name)
            elif importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            found[name] = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
        except Exception as error:
            found[name] = f"not importable ({one_line(error, 160)})"
    return found


def _api(check) -> str | None:
    try:
        return None if check() else "missing"
    except Exception as error:
        return one_line(error, 200)


def torch_apis() -> dict:
    """The APIs the GPU program uses that moved between torch 2.11 and 2.13: None when present,
    else what is missing (the stages that need it are skipped, saying it needs a newer torch)."""
    import torch
    import torch.nn.attention.flex_attention as flex

    def has_param(fn, name):
        return name in inspect.signature(fn).parameters

    checks = {
        "BlockMask.from_kv_blocks(seq_lengths)":
            lambda: has_param(flex.BlockMask.from_kv_blocks, "seq_lengths"),
        "flex_attention(return_aux=AuxRequest)":
            lambda: hasattr(flex, "AuxRequest") and has_param(flex.flex_attention, "return_aux"),
        "flex_attention(kernel_options)": lambda: has_param(flex.flex_attention, "kernel_options"),
        "torch.library.custom_op": lambda: hasattr(torch.library, "custom_op"),
        "torch.library.triton_op/wrap_triton":
            lambda: hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"),
        "torch._dynamo.config.fail_on_recompile_limit_hit":
            lambda: hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"),
        "torch.library.opcheck": lambda: hasattr(torch.library, "opcheck"),
    }
    return {name: _api(check) for name, check in checks.items()}


def plugin_imports() -> dict:
    """The plugin's layers as each stage imports them: None, or the one-line error."""
    found = {}
    for module in ("rat_plugin.ops", "rat_plugin.generate", "rat_plugin.train_spec"):
        try:
            importlib.import_module(module)
            found[module] = None
        except BaseException as error:  # train_spec's one-line errors exit
            found[module] = one_line(error, 300)
    return found


def capabilities(gpu: dict, torch_version: str, found: dict, apis: dict, plugin: dict) -> dict:
    """What the runner's stage table asks for: None when present, else why not."""
    caps = {"gpu": None if gpu["available"] else
            "no CUDA GPU visible (torch.cuda.is_available() is False): `make gpu-check DRY=1` "
            "runs the check on CPU"}
    for name, version in found.items():
        caps[f"package:{name}"] = version if version.startswith("not importable") else None
    for name, missing in apis.items():
        caps[f"api:{name}"] = None if missing is None else \
            f"torch {torch_version} lacks {name} ({missing}): needs a newer torch"
    for module, error in plugin.items():
        caps[module] = error
    return caps


def run(spec: dict, recorder: Recorder) -> str | None:
    results = recorder.data["results"]
    results["wheels"] = install_wheels(spec)
    recorder.save()
    importlib.invalidate_caches()  # the target was empty when this process started
    results.update(gpu=gpu_info(), versions=versions(), packages=packages())
    recorder.save()
    apis, plugin = torch_apis(), plugin_imports()
    results.update(torch_apis=apis, plugin=plugin,
                   capabilities=capabilities(results["gpu"], results["versions"]["torch"],
                                             results["packages"], apis, plugin))
    if "torchao" in results["packages"] and results["packages"]["torchao"].startswith("not"):
        recorder.note("torchao is not importable: float8 training is not checked")
    return results["wheels"].get("error")


if __name__ == "__main__":
    main(run)

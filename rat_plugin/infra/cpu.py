"""CPU/gloo mode: what torchtitan 0.2.2's stock trainer needs to run FSDP2 on CPU-only ranks.

Applied once by ``rat_plugin.train_spec`` at import, i.e. at ``[experimental] custom_import``
time (before the trainer picks its device), and only when ``torch.cuda.is_available()`` is
False. Nothing here edits installed files or patches torch; on a GPU machine it is a no-op.

1. torchtitan resolves its device at import as ``_get_available_device_type() or "cuda"``,
   so a CPU-only host gets "cuda". ``use_cpu`` points the module-level ``device_type`` /
   ``device_module`` globals of the torchtitan modules that read them at "cpu" and at
   ``CPUDeviceModule``. The distributed backend then resolves to gloo and meshes to CPU.
2. ``CPUDeviceModule`` is ``torch.cpu`` plus the CUDA-style calls torchtitan's memory monitor
   and process-group timeout code make (memory stats report the process's peak RSS; the
   "device index" is 0 so ``barrier(device_ids=[0])`` names ``cpu:0``).
3. gloo has no PREMUL_SUM/AVG reduce-scatter: ``parallelize_fn`` calls
   ``force_sum_reduction`` on every FSDP module. The trainer already divides the loss by the
   global token count and FSDP's own gradient division is off, so a plain sum is exact.
4. Context parallel: torchtitan 0.2.2's trainer enters no CP context manager of its own; it only
   shards inputs/labels/positions (``prepare_context_parallel_input``). torch's SDPA ring
   attention is switched on only by a model's parallelize_fn calling
   ``apply_cp_to_attention_module``, which ours never does, so nothing is needed here for CP.
"""

import importlib
import os
import resource
import types

import torch
from torch import nn

# torchtitan modules holding `from torchtitan.tools.utils import device_type/device_module`.
_DEVICE_GLOBAL_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.tools.profiling",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.components.metrics",
)


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_stats(device=None) -> dict[str, int]:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "active_bytes.all.peak": peak_kib * 1024,
        "reserved_bytes.all.peak": peak_kib * 1024,
        "num_alloc_retries": 0,
        "num_ooms": 0,
    }


CPUDeviceModule = types.SimpleNamespace(
    set_device=torch.cpu.set_device,
    synchronize=torch.cpu.synchronize,
    current_device=lambda: 0,
    get_device_name=lambda device=None: "CPU",
    get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=_total_ram()),
    memory_stats=_memory_stats,
    reset_peak_memory_stats=lambda device=None: None,  # RSS peaks cannot be reset
    empty_cache=lambda: None,
)


# Set by the GPU recipe's dry run (rat_plugin/dry_run.py): "auto" kernels resolve as on CUDA.
KERNELS_AS_ON_CUDA = False


def cpu_mode() -> bool:
    return not torch.cuda.is_available()


def use_cpu() -> None:
    """Point torchtitan's device globals at the CPU (item 1 of the module docstring)."""
    for name in _DEVICE_GLOBAL_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = CPUDeviceModule


def force_sum_reduction(model: nn.Module) -> None:
    """Reduce-scatter gradients with SUM on gloo (item 3 of the module docstring)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)

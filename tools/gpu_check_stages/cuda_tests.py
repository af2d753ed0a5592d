"""pytest plugin of the correctness stage: keep only the CUDA tests; record outcomes as they come.

A CUDA test is one parametrised on the device "cuda", or marked ``skipif`` with a reason that
says it needs CUDA ("needs CUDA", "needs a CUDA device", "CUDA only, ..."): the convention of
tests/. On a GPU they run; elsewhere they are collected and reported as skipped. Loaded with
``-p gpu_check_stages.cuda_tests`` (pytest-xdist workers load it the same way).
"""

import re

NEEDS_CUDA = re.compile(r"\bneeds (a )?CUDA\b|\bCUDA only\b")


def is_cuda_test(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(str(v) == "cuda" for v in callspec.params.values()):
        return True
    return any(NEEDS_CUDA.search(str(mark.kwargs.get("reason", "")))
               for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items) -> None:
    dropped = [item for item in items if not is_cuda_test(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if is_cuda_test(item)]

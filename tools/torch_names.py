"""The torch and triton names the plugin and its tools use, checked against torch 2.11.

    python tools/torch_names.py            # names the running torch / triton lack
    python tools/torch_names.py --write    # with torch 2.11: record them all as checked

pyproject promises ``torch>=2.11`` and the GPU node runs torch 2.11 with triton 3.6, while
development and CI run torch 2.13. ``tools/torch_2_11_names.txt`` lists every ``torch.*`` /
``triton.*`` name used by ``rat_plugin/`` and ``tools/`` (imports and attribute chains off an
imported module), each one found in torch 2.11.0 and triton 3.6.0; tests/test_torch_names.py
fails when the code uses a name not in it, so a 2.13-only API cannot creep in unnoticed. To add
one: in a venv with ``pip install torch==2.11.0`` (and the project), run ``--write``.
Only names are checked: a signature or behaviour that differs is for the tests under 2.11
(docs/gpu_fast_path.md, "torch 2.11").
"""

import argparse
import ast
import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKED = Path(__file__).with_name("torch_2_11_names.txt")
ROOTS = ("torch", "triton")
VERSIONS = {"torch": "2.11.", "triton": "3.6."}
# Names torch 2.11 lacks that the code uses only where present, and what runs instead.
NEWER_ONLY = {
    "torch.distributed._functional_collectives.all_gather_single":
        "context_parallel._all_gather: all_gather_tensor_autograd with a contiguous gradient",
}


def names_in(source: str) -> set[str]:
    """``torch.*`` / ``triton.*`` names a module imports or reaches by attribute from them."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in ROOTS:
                    found.add(a.name)
                    alias[a.asname or top] = a.name if a.asname else top
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ROOTS:
            for a in node.names:
                found.add(f"{node.module}.{a.name}")
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if chain and isinstance(node, ast.Name) and node.id in alias:
            found.add(".".join([alias[node.id], *reversed(chain)]))
    return found


def used_names() -> dict[str, str]:
    """name -> first file using it, over rat_plugin/ and tools/."""
    used: dict[str, str] = {}
    for path in sorted([*(REPO / "rat_plugin").rglob("*.py"), *(REPO / "tools").glob("*.py")]):
        for name in names_in(path.read_text()):
            used.setdefault(name, str(path.relative_to(REPO)))
    return used


def checked_names() -> set[str]:
    return {ln for ln in CHECKED.read_text().splitlines() if ln and not ln.startswith("#")}


def unchecked(used: dict[str, str]) -> list[str]:
    """Used names neither checked against torch 2.11 nor known as NEWER_ONLY, with their file."""
    known = checked_names() | set(NEWER_ONLY)
    return [f"{name} ({where})" for name, where in sorted(used.items()) if name not in known]


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute path from the longest importable one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help=f"record every used name in {CHECKED.name} (torch 2.11 only)")
    args = parser.parse_args(argv)
    import torch
    import triton

    used = used_names()
    missing = sorted(n for n in used if n not in NEWER_ONLY and not resolves(n))
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    for name in missing:
        print(f"{name} ({used[name]}): not in torch {versions['torch']} / triton "
              f"{versions['triton']}")
    if not args.write:
        return 1 if missing else 0
    wrong = [f"{k} {v}" for k, v in versions.items() if not v.startswith(VERSIONS[k])]
    if wrong or missing:
        print(f"not written: {', '.join(wrong) or 'names missing'} (run with torch 2.11.x, "
              "triton 3.6.x; replace or shim the missing names)", file=sys.stderr)
        return 1
    header = (f"# The torch / triton names rat_plugin/ and tools/ use, found in torch "
              f"{versions['torch']},\n# triton {versions['triton']} (NEWER_ONLY aside): "
              "written by `python tools/torch_names.py --write`.\n")
    tmp = CHECKED.with_name(f".{CHECKED.name}.tmp")
    tmp.write_text(header + "".join(f"{n}\n" for n in sorted(set(used) - set(NEWER_ONLY))))
    os.replace(tmp, CHECKED)  # atomic: the old list or the new one
    print(f"{len(used)} names checked against torch {versions['torch']} -> {CHECKED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

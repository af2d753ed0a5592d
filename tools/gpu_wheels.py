"""The wheels a bare GPU node lacks for `make gpu-check`: download them here, install them there.

    python tools/gpu_wheels.py download [--dest .whl] [--python-version 3.12]   # make gpu-wheels
    python tools/gpu_wheels.py smoke TARGET     # after install(): use them as the stages do

``download`` (on a connected machine) fetches exactly the pins of ``tools/gpu_wheels.txt``, with
``--no-deps`` (torch is never resolved), built for CPython 3.12 on manylinux x86_64 (the node's
Python), into a fresh folder that replaces ``dest`` whole only when complete, then prints each
wheel's size and the total, and fails above 40 MiB (the old folder stays).

``install(wheel_dir, target)`` (on the node, offline) runs ``pip install --no-index --no-deps``
of those wheels into ``target`` with the current interpreter: the node's torch, triton and CUDA
libraries are never touched, and a folder holding any of them or two versions of one package is
refused (pip refuses a wheel built for another Python). ``missing_requirements(target)`` lists
what the installed wheels need that neither ``target`` nor the interpreter has.

``smoke`` then uses them as the check's stages do (imports, config parse, a dataset).

Imports only the standard library at module level: the GPU check imports it first.
"""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

PINS = Path(__file__).with_name("gpu_wheels.txt")
DEFAULT_DEST = Path(__file__).resolve().parent.parent / ".whl"
MAX_MIB = 40.0
NODE_PYTHON = "3.12"
# Wheels the node's glibc takes (torch 2.11's own wheels are manylinux_2_28), and pure ones.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "any")
# What the GPU node already has (issue 20): never carried, and never shadowed in the target.
NODE_HAS = frozenset("""
absl-py accelerate aiohttp aiosignal attrs certifi charset-normalizer click cloudpickle einops
filelock frozenlist fsspec hf-xet huggingface-hub idna jinja2 markdown markdown-it-py mdurl
multidict networkx numpy packaging pandas pillow protobuf psutil pyarrow pytest pytest-timeout
pytest-xdist python-dateutil pyyaml regex requests rich safetensors sentencepiece setuptools six
sympy tabulate tensorboard tiktoken tokenizers torch tqdm transformers triton typing-extensions
typing-inspect urllib3 xxhash yarl zipp shellingham typer matplotlib scipy scikit-learn
""".split())
REFUSED = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")
FIX = "rerun `make gpu-wheels` on a connected machine and copy the folder again"


class WheelError(RuntimeError):
    """A wheel folder that cannot be installed, or an install that failed (one-line message)."""


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = PINS) -> dict[str, str]:
    """name -> version of the pin file (``name==version`` lines; # comments)."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if match is None:
            raise WheelError(f"{path}:{number}: {line!r} is not name==version")
        pins[canonical(match[1])] = match[2]
    return pins


def wheel_dist(wheel: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name (name-version[-build]-py-abi-plat)."""
    parts = wheel.name[: -len(".whl")].split("-")
    if not wheel.name.endswith(".whl") or len(parts) not in (5, 6):
        raise WheelError(f"{wheel} is not a wheel file name: {FIX}")
    return canonical(parts[0]), parts[1]


def check_folder(wheel_dir: Path) -> list[Path]:
    """The folder's wheels, refused (one line) when it holds none, a torch/triton/nvidia wheel
    (the node's own, never replaced) or two versions of one package."""
    wheel_dir = Path(wheel_dir)
    if not wheel_dir.is_dir():
        raise WheelError(f"wheel folder {wheel_dir} does not exist: {FIX}")
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise WheelError(f"wheel folder {wheel_dir} holds no .whl file: {FIX}")
    seen: dict[str, Path] = {}
    for wheel in wheels:
        name, _ = wheel_dist(wheel)
        if REFUSED.match(name):
            raise WheelError(
                f"{wheel} would replace the node's own {name}: remove it from {wheel_dir} "
                "(the GPU check runs on the installed torch, triton and CUDA libraries)"
            )
        if name in seen:
            raise WheelError(
                f"{wheel_dir} holds two wheels of {name} ({seen[name].name}, {wheel.name}): "
                f"{FIX}"
            )
        seen[name] = wheel
    return wheels


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.whl")) / 2**20


def check_size(folder: Path, max_mib: float = MAX_MIB) -> float:
    """The folder's wheels in MiB, refused above ``max_mib`` (the node's carry budget)."""
    mib = folder_mib(folder)
    if mib > max_mib:
        raise WheelError(f"the wheels in {folder} take {mib:.1f} MiB, over the {max_mib:g} MiB "
                         "budget: drop a pin from tools/gpu_wheels.txt or pick smaller builds")
    return mib


def install(wheel_dir: Path, target: Path) -> list[str]:
    """Install every wheel of ``wheel_dir`` into ``target`` offline, with the current
    interpreter's pip, without dependencies; return the installed distribution names.

    Put ``target`` first on ``sys.path`` / PYTHONPATH to use them. Raises :class:`WheelError`
    (one line naming the folder and the fix) on a refused folder or a failed install.
    """
    wheels = check_folder(Path(wheel_dir))
    if importlib.util.find_spec("pip") is None:
        raise WheelError(f"{sys.executable} has no pip to install the wheels of {wheel_dir}: "
                         "run the check with a Python that has pip (python -m pip --version)")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--disable-pip-version-check",
               "--target", str(target), *map(str, wheels)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise WheelError(f"installing the wheels of {wheel_dir} into {target} failed ({reason}): "
                         f"{FIX}")
    installed = {(canonical(d.name[: -len(".dist-info")].rsplit("-", 1)[0]),
                  d.name[: -len(".dist-info")].rsplit("-", 1)[1])
                 for d in target.glob("*.dist-info")}
    names = [wheel_dist(wheel) for wheel in wheels]
    absent = [f"{n} {v}" for n, v in names if (n, v) not in installed]
    if absent:
        raise WheelError(f"pip reported success but {target} lacks {', '.join(absent)}: {FIX}")
    return [n for n, _ in names]


def missing_requirements(target: Path) -> list[str]:
    """What the distributions in ``target`` require (Requires-Dist without extras, markers
    evaluated) that neither ``target`` nor this interpreter's path provides, one line each.
    Needs ``packaging`` (the node has it)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    path = [str(target), *sys.path]
    have = {canonical(d.metadata["Name"]): d.version
            for d in metadata.distributions(path=path) if d.metadata["Name"]}
    missing = []
    for dist in metadata.distributions(path=[str(target)]):
        for spec in dist.requires or ():
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            found = have.get(canonical(req.name))
            if found is None or not req.specifier.contains(found, prereleases=True):
                what = "absent" if found is None else f"found {found}"
                missing.append(f"{dist.metadata['Name']} {dist.version} needs {req} ({what})")
    return sorted(missing)


def pip_download_command(dest: Path, python_version: str, pins: dict[str, str]) -> list[str]:
    """pip download of exactly ``pins`` for CPython ``python_version`` on manylinux x86_64."""
    tag = python_version.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--python-version", python_version,
               "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none",
               "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + [f"{name}=={version}" for name, version in pins.items()]


def download(dest: Path = DEFAULT_DEST, python_version: str = NODE_PYTHON,
             pins_file: Path = PINS, max_mib: float = MAX_MIB, log=print) -> list[Path]:
    """Fetch the pinned wheels into a fresh ``dest`` (replaced whole, only once complete and
    within ``max_mib``); return them."""
    from rat_plugin.atomic import atomic_dir

    pins = read_pins(pins_file)
    refused = sorted(n for n in pins if REFUSED.match(n) or n in NODE_HAS)
    if refused:
        raise WheelError(f"{pins_file} pins {', '.join(refused)}, which the node already has: "
                         "remove them (the check runs on the node's own)")
    with atomic_dir(dest, force=True, log=log) as tmp:
        done = subprocess.run(pip_download_command(tmp, python_version, pins),
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
            raise WheelError(f"pip download failed ({(lines or ['no error line'])[-1]}): it "
                             f"needs the package index; pins in {pins_file}")
        wheels = check_folder(tmp)
        got = dict(wheel_dist(w) for w in wheels)
        if got != pins:
            raise WheelError(f"pip download brought {sorted(got.items())}, not the pins of "
                             f"{pins_file}")
        for wheel in wheels:
            log(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
        log(f"{check_size(tmp, max_mib):7.2f} MiB  total, {len(wheels)} wheels for CPython "
            f"{python_version} (budget {max_mib:g} MiB) -> {Path(dest).resolve()}")
    return sorted(Path(dest).glob("*.whl"))


def smoke(target: Path, config: Path) -> dict:
    """Use the carried packages as the check's stages do, with ``target`` first on the path.

    First the requirements of the installed wheels (refused, one line, when one is missing),
    then: import ``torchtitan.train`` and ``rat_plugin.train_spec``, parse ``config`` with
    torchtitan's ConfigManager (tyro), build and map a datasets.Dataset (dill, multiprocess,
    xxhash), import ``torchao.float8``. Returns each package's file and the float8 state.
    """
    missing = missing_requirements(target)
    if missing:
        raise WheelError(f"the wheels in {target} lack what they need ({'; '.join(missing)}): "
                         f"add it to {PINS.name} or to the node")
    sys.path.insert(0, str(target))
    import datasets
    import torchtitan.train  # noqa: F401
    from torchtitan.config import ConfigManager

    import rat_plugin.train_spec  # noqa: F401

    job = ConfigManager().parse_args(["--job.config_file", str(config)])
    mapped = datasets.Dataset.from_dict({"text": ["a b", "c"]}).map(lambda s: {"n": len(s["text"])})
    try:
        import torchao.float8  # noqa: F401

        float8 = "ok"
    except ImportError as err:
        float8 = f"skipped: {err}"
    files = {name: sys.modules[name].__file__
             for name in ("torch", "torchtitan", "datasets", "tyro", "typeguard", "torchao")
             if name in sys.modules}
    return {"files": files, "model": job.model.name, "mapped": list(mapped["n"]),
            "float8": float8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="fetch the pinned wheels (needs the package index)")
    get.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    get.add_argument("--python-version", default=NODE_PYTHON,
                     help="CPython version the wheels are for (the node's: %(default)s)")
    use = sub.add_parser("smoke", help="use the installed wheels as the check does (JSON line)")
    use.add_argument("target", type=Path, help="the folder install() filled")
    use.add_argument("--config", type=Path, default=Path("train_configs/rat_debug.toml"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rat_plugin, uninstalled
    try:
        if args.command == "download":
            download(args.dest, args.python_version)
        else:
            print(json.dumps(smoke(args.target, args.config)))
    except WheelError as err:
        print(f"gpu-wheels: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

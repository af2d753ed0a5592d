"""The wheels carried to a bare GPU node (tools/gpu_wheels.py, issue 20).

The node has Python 3.12, torch 2.11 and the packages of ``NODE_HAS``, no network. Here: the
folder ``make gpu-wheels`` builds is the pins, for CPython 3.12 manylinux x86_64, under 40 MiB;
and the same pins, downloaded for this interpreter, installed with ``install`` into an empty
target, are all a fresh virtual environment needs to import torchtitan's trainer and the plugin,
when it sees only the node's packages of this machine (symlinks, torch among them) and not the
rest (the shared torchtitan, datasets, tyro, torchao ...). Removing one carried wheel makes that
fail. The slow tests download from the package index (a test of a download tool).
"""

import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_wheels  # noqa: E402
from gpu_wheels import WheelError, canonical, check_folder, check_size, install  # noqa: E402


def fake_wheels(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not a zip")
    return folder


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_pins_are_exact_commented_and_leave_the_node_alone():
    pins = gpu_wheels.read_pins()
    lines = gpu_wheels.PINS.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"pin {line!r} has no comment saying why"
    assert not [n for n in pins if gpu_wheels.REFUSED.match(n) or n in gpu_wheels.NODE_HAS]
    pyproject = (REPO / "pyproject.toml").read_text()
    for name in ("torchtitan", "torchao"):  # the versions the project itself is tested with
        assert f'"{name}=={pins[name]}"' in pyproject


@pytest.mark.parametrize("wheel, says", [
    ("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", "node's own torch"),
    ("triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64.whl", "node's own triton"),
    ("nvidia_cublas-13.1.0.3-py3-none-manylinux_2_27_x86_64.whl", "node's own nvidia-cublas"),
])
def test_install_refuses_what_the_node_has(tmp_path, wheel, says):
    folder = fake_wheels(tmp_path / "whl", "tyro-1.0.17-py3-none-any.whl", wheel)
    with pytest.raises(WheelError) as err:
        install(folder, tmp_path / "target")
    assert says in one_line(err) and str(folder) in str(err.value)
    assert not (tmp_path / "target").exists()


def test_install_refuses_two_versions_and_empty_folders(tmp_path):
    folder = fake_wheels(tmp_path / "two", "tyro-1.0.17-py3-none-any.whl",
                         "tyro-1.0.16-py3-none-any.whl")
    with pytest.raises(WheelError, match="two wheels of tyro") as err:
        install(folder, tmp_path / "target")
    one_line(err)
    for empty in (tmp_path / "absent", fake_wheels(tmp_path / "empty")):
        with pytest.raises(WheelError, match="make gpu-wheels") as err:
            install(empty, tmp_path / "target")
        assert str(empty) in one_line(err)
    assert not (tmp_path / "target").exists()


def test_install_refuses_wheels_for_another_python(tmp_path):
    other = "multiprocess-0.70.19-py27-none-any.whl"  # a folder made for another interpreter
    folder = fake_wheels(tmp_path / "whl", "tyro-1.0.17-py3-none-any.whl", other)
    with pytest.raises(WheelError, match="make gpu-wheels") as err:
        install(folder, tmp_path / "target")
    assert f"{other} is not a supported wheel" in one_line(err)


def test_a_failed_install_is_one_line_naming_the_folder_and_the_fix(tmp_path):
    folder = fake_wheels(tmp_path / "whl", "tyro-1.0.17-py3-none-any.whl")  # not a zip
    with pytest.raises(WheelError, match="make gpu-wheels") as err:
        install(folder, tmp_path / "target")
    assert str(folder) in one_line(err)


def test_size_budget(tmp_path):
    folder = fake_wheels(tmp_path / "whl", "big-1.0-py3-none-any.whl")
    (folder / "big-1.0-py3-none-any.whl").write_bytes(bytes(3 * 2**20))
    assert check_size(folder, max_mib=40) == pytest.approx(3.0)
    with pytest.raises(WheelError, match="3.0 MiB, over the 2 MiB budget") as err:
        check_size(folder, max_mib=2)
    one_line(err)


@pytest.mark.slow
def test_make_gpu_wheels_builds_the_pins_for_the_node_under_budget(tmp_path):
    dest = tmp_path / "whl"
    done = subprocess.run(["make", "-s", "gpu-wheels", f"GPU_WHEELS={dest}",
                           f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MiB  total" in done.stdout
    wheels = check_folder(dest)
    assert dict(gpu_wheels.wheel_dist(w) for w in wheels) == gpu_wheels.read_pins()
    node = set(cpython_tags((3, 12), platforms=gpu_wheels.PLATFORMS[:-1]))
    node |= set(compatible_tags((3, 12), "cp312", platforms=gpu_wheels.PLATFORMS[:-1]))
    for wheel in wheels:
        assert parse_wheel_filename(wheel.name)[3] & node, f"{wheel.name} is not for the node"
    assert check_size(dest) < gpu_wheels.MAX_MIB


def node_distributions() -> set[str]:
    """NODE_HAS and, as installed here, what those need (the node's packages work, so their own
    requirements are there too)."""
    todo, names = list(gpu_wheels.NODE_HAS), set()
    while todo:
        name = canonical(todo.pop())
        if name in names:
            continue
        names.add(name)
        try:
            requires = metadata.distribution(name).requires or ()
        except metadata.PackageNotFoundError:
            continue  # absent here: then absent from the view too (stricter than the node)
        todo += [r.name for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    return names


def node_view(folder: Path) -> Path:
    """A folder of symlinks to this interpreter's packages that the node has, and no others."""
    names = node_distributions()
    assert not names & set(gpu_wheels.read_pins()), "a node package needs a carried one"
    folder.mkdir(parents=True)
    for name in sorted(names):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or ()}:
            source = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and source.exists():
                if not (folder / top).exists():
                    (folder / top).symlink_to(source)
    return folder


@pytest.mark.slow
def test_carried_wheels_are_all_a_node_needs_for_the_trainer(tmp_path):
    wheels = tmp_path / "whl"  # the pins, for this interpreter (the node's are cp312)
    gpu_wheels.download(wheels, f"{sys.version_info.major}.{sys.version_info.minor}",
                        log=lambda _: None)
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env)
    site = next((env / "lib").glob("python3*/site-packages"))
    # named like the node's folder: dill pickles modules outside site-packages and the
    # interpreter's prefix by value (datasets' fingerprints), which this view's links may be
    (site / "node.pth").write_text(f"{node_view(tmp_path / 'node' / 'site-packages')}\n")
    target = tmp_path / "target"

    def smoke() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(env / "bin" / "python"), "tools/gpu_wheels.py", "smoke", str(target)], cwd=REPO,
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": "", "HF_DATASETS_OFFLINE": "1"})

    held_back = wheels / "held_back"  # tyro's own need: the kind of wheel a pin list forgets
    held_back.mkdir()
    for wheel in wheels.glob("typeguard-*.whl"):
        wheel.rename(held_back / wheel.name)
    assert "typeguard" not in install(wheels, target)
    done = smoke()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "tyro 1.0.17 needs typeguard>=4.0.0 (absent)" in done.stderr.strip().splitlines()[-1]
    parse = ("from torchtitan.config import ConfigManager; ConfigManager().parse_args("
             "['--job.config_file', 'train_configs/rat_debug.toml'])")
    done = subprocess.run([str(env / "bin" / "python"), "-c", parse], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True,
                          text=True, timeout=600)
    assert "No module named 'typeguard'" in done.stderr  # not just metadata: tyro needs it

    assert install(held_back, target) == ["typeguard"]
    done = smoke()
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["float8"] == "ok"
    assert report["model"] == "rat" and report["mapped"] == [3, 1]
    files = report["files"]
    assert files["torch"].startswith(str(tmp_path / "node")), files  # the node's torch
    for name in ("torchtitan", "datasets", "tyro", "typeguard", "torchao"):
        assert files[name].startswith(str(target)), files

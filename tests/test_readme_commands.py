"""Every shell command of README.md and docs/*.md exists and parses, without running it.

Each ```bash block is read as a shell would split it (continuations joined; comments, the docs'
``[--optional flags]`` brackets and ``...`` dropped; ``$VARIABLES`` given sample values,
``$(...)`` a placeholder; ``&&``, ``|`` and ``;`` separate commands). Each command is checked by
what runs it:

- ``python -m M`` / ``python tools/x.py`` / a console script (``torchrun``, ``hf``,
  ``lm_eval``): the module, file or installed entry point exists, and its own parser accepts
  the arguments. argparse programs run in this process up to their top-level ``parse_args`` and
  stop there (nothing after it runs); torchtitan's trainer (``-m torchtitan.train``,
  ``-m rat_plugin.train``) goes through its ConfigManager: the TOML, our ``[rat]`` section and
  tyro's parse of every ``--section.key`` flag, then the model name and flavor must be
  registered; torchrun goes through ``torch.distributed.run``'s parser and then its training
  script is checked the same way; click programs (``hf``) through click's own parse; pytest
  through its option parser, its paths must exist.
- ``make ...``: ``make -n`` knows the targets, the variables set are the Makefile's, and the
  recipe it prints is checked line by line as above (a new target is checked with no change
  here).
- ``pip install -e ".[x]"``: the extras exist in pyproject.toml.
- Environment variables set before a command are read somewhere in our code (or are known
  third-party settings): a misspelt one would be ignored silently.
- Shell-only commands (mkdir, mv, git, scontrol, ...) have nothing to check. Any other command
  fails, naming the file and line, so that it gets a checker.

RUN_FOR_REAL names the tests that also run a command for real; the rest cannot run in CI
(GPUs, downloads, a cluster) and this syntax check is what proves them.
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands that tests (or CI itself) run for real, by their text in the documents: (where, how).
# The syntax check still runs on them.
RUN_FOR_REAL = {
    "make test": (".ci/run", "CI's own command"),
    "make train-debug": ("tests/test_trainer.py::test_rat_debug_trains",
                         "its torchrun command on rat_debug.toml, fewer steps"),
    "python tools/dry_run.py train_configs/rat_1p3b.toml": (
        "tests/test_gpu_recipe.py::test_gpu_recipe_dry_run_matches_the_eager_portable_run",
        "the trainer options the tool adds, on every shipped GPU config"),
}
# Nothing to check but that the shell has them.
SHELL_ONLY = {"mkdir", "mv", "cp", "rm", "ls", "cd", "echo", "printf", "export", "set", "test",
              "exit", "true", "false", "command", "source", "sleep", "touch", "cat", "head",
              "tail", "grep", "sed", "wc", "tee", "find", "du", "df", "git", "scontrol",
              "squeue", "nvidia-smi", "tensorboard", "tar"}
SHELL_KEYWORDS = {"if", "for", "while", "case", "until", "function"}  # compound statements
LAUNCHERS = {"srun", "time", "nohup", "exec", "env"}  # run the command that follows
# Environment variables that the user's cluster or shell provides: sample values.
SAMPLE_VALUES = {"HEAD_NODE": "node0", "SLURM_JOB_NODELIST": "node[0-3]", "SLURM_NNODES": "4",
                 "SLURM_JOB_ID": "1234"}
# Settings read by other programs (ours are found in our code).
THIRD_PARTY_ENV = {"HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME",
                   "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "OMP_NUM_THREADS",
                   "NCCL_DEBUG", "TORCH_LOGS"}
TRAINERS = ("torchtitan.train", "rat_plugin.train")


class CommandError(Exception):
    """A command that does not exist or whose arguments its program refuses."""


@dataclass
class Command:
    where: str  # file:line
    text: str  # the logical line as written (continuations joined)

    @property
    def bare(self) -> str:
        """The command without its comment."""
        return " ".join(shlex.split(self.text, comments=True))

    def __str__(self):
        return f"{self.where} {self.bare[:60]}"


def commands(path: Path) -> list[Command]:
    """The logical lines of the file's bash blocks."""
    found, block, pending = [], False, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = line[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if not block:
            continue
        if pending is None:
            pending = (number, "")
        start, text = pending
        text += line.rstrip()
        if text.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        if shlex.split(text, comments=True):  # not a comment line
            found.append(Command(f"{path.relative_to(REPO)}:{start}", " ".join(text.split())))
    return found


ALL = [c for path in DOCUMENTS for c in commands(path)]


# ---- splitting a line as the shell does ------------------------------------------------------

def simple_commands(text: str, variables: dict[str, str]) -> list[list[str]]:
    """The argument vectors of a logical line; ``variables`` (the block's assignments so far)
    gains the line's own assignments."""
    text = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", text)  # $(...): its output

    def value(match):
        name = match.group(1) or match.group(2)
        if name in variables:
            return variables[name]
        if name in SAMPLE_VALUES:
            return SAMPLE_VALUES[name]
        raise CommandError(f"${name} has no sample value: add one to SAMPLE_VALUES")

    text = re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)
    # The docs' optional flags, [--a x --b]: they must parse too.
    text = re.sub(r"(?<!\S)\[(-[^\[\]]*)\](?!\S)", r"\1", text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    vectors, argv, tokens = [], [], list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in ("&&", "||", ";", "|", "&"):
            vectors.append(argv)
            argv = []
        elif token in (">", ">>", "<", ">&", "2>"):  # a redirection and its target
            if argv and argv[-1].isdigit():
                argv.pop()
            i += 1
        elif token not in ("(", ")", "..."):
            argv.append(token)
        i += 1
    vectors.append(argv)
    for argv in vectors:
        if argv and all(re.match(r"^\w+=", a) for a in argv):  # plain assignments
            variables.update(a.split("=", 1) for a in argv)
    return [argv for argv in vectors if argv]


# ---- the checkers ------------------------------------------------------------------------------

def check_line(text: str, variables: dict[str, str]) -> None:
    words = text.split()
    if words[0] in SHELL_KEYWORDS:
        return
    for argv in simple_commands(text, variables):
        check_argv(argv)


def check_argv(argv: list[str]) -> None:
    env, argv = {}, list(argv)
    while argv:
        if re.match(r"^[A-Za-z_]\w*=", argv[0]):
            name, value = argv.pop(0).split("=", 1)
            env[name] = value
        elif argv[0] in LAUNCHERS:
            argv.pop(0)
            while argv and argv[0].startswith("-"):  # the launcher's own --flag=value options
                argv.pop(0)
        else:
            break
    if not argv:
        return  # a shell variable
    program, args = argv[0], argv[1:]
    if program == "make":
        return check_make(args, env)
    check_environment(env)
    if program in ("python", "python3") or program == sys.executable:
        return check_python(args)
    if program in ("pip", "pip3"):
        return check_pip(args)
    if program in SHELL_ONLY:
        return
    return check_console_script(program, args)


def check_environment(env: dict[str, str], make_variables: frozenset = frozenset()) -> None:
    for name in env:
        if name not in THIRD_PARTY_ENV and name not in make_variables and not read_by_our_code(
                name):
            raise CommandError(f"environment variable {name} is read nowhere in rat_plugin/, "
                               "tools/ or the Makefile (misspelt?); a third-party one goes in "
                               "THIRD_PARTY_ENV")


def read_by_our_code(name: str) -> bool:
    files = [*REPO.glob("rat_plugin/**/*.py"), *REPO.glob("tools/*.py"), REPO / "Makefile"]
    return any(re.search(rf"\b{name}\b", f.read_text()) for f in files)


def check_python(args: list[str]) -> None:
    while args and args[0] in ("-u", "-O", "-B", "-E", "-s", "-I"):
        args = args[1:]
    if not args or args[0] == "-c":
        return
    if args[0] == "-m":
        return check_module(args[1], args[2:])
    return check_script(args[0], args[1:])


def check_module(name: str, args: list[str]) -> None:
    if name in TRAINERS:
        return check_trainer(name, args)
    if name == "torch.distributed.run":
        return check_torchrun(args)
    if name == "pytest":
        return check_pytest(args)
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        raise CommandError(f"python -m {name}: no such module here (is its extra installed?)")
    parse_only(lambda: runpy.run_module(name, run_name="__main__", alter_sys=True),
               [name, *args], f"python -m {name}")


def check_script(path: str, args: list[str]) -> None:
    file = REPO / path
    if not file.is_file():
        raise CommandError(f"python {path}: no such file in the repository")
    namespace, extras = parse_only(lambda: runpy.run_path(str(file), run_name="__main__"),
                                   [str(file), *args], f"python {path}")
    if path == "tools/dry_run.py":  # its options after -- are the trainer's
        return check_trainer("torchtitan.train", ["--job.config_file", namespace.config,
                                                  *extras[extras[:1] == ["--"]:]])
    if extras:
        raise CommandError(f"python {path}: arguments {extras} are left unparsed")


@contextlib.contextmanager
def logging_kept():
    """Undo what a program's start does to logging (lm_eval's CLI gives its logger a handler on
    the stderr of that moment and stops propagation), so later tests log as before."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    saved = {id(log): (log, log.handlers[:], log.level, log.propagate, log.disabled)
             for log in loggers}
    try:
        yield
    finally:
        for log in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if not isinstance(log, logging.Logger):
                continue
            _, handlers, level, propagate, disabled = saved.get(
                id(log), (log, [], logging.NOTSET, True, False))
            log.handlers[:] = handlers
            log.level, log.propagate, log.disabled = level, propagate, disabled


class _Parsed(BaseException):  # not an Exception: programs' own except clauses let it through
    def __init__(self, namespace, extras):
        self.namespace, self.extras = namespace, extras


def parse_only(run, argv: list[str], what: str) -> tuple[argparse.Namespace, list[str]]:
    """(namespace, unparsed arguments) of the program ``run()`` once its top-level argparse
    parse of ``argv`` succeeds; the program stops there. A parse error is a CommandError with
    the program's own message."""
    real_parse_args = argparse.ArgumentParser.parse_args
    real_parse_known = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse(real, stop):
        def patched(self, args=None, namespace=None):
            depth[0] += 1
            try:
                result = real(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:  # the program's own call, not argparse's inner ones
                raise stop(result)
            return result
        return patched

    out = io.StringIO()
    saved_argv = sys.argv[:]
    sys.argv = list(argv)
    try:
        with (pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out),
              contextlib.redirect_stderr(out), warnings.catch_warnings(), logging_kept()):
            warnings.simplefilter("ignore")
            mp.setattr(argparse.ArgumentParser, "parse_args",
                       parse(real_parse_args, lambda ns: _Parsed(ns, [])))
            mp.setattr(argparse.ArgumentParser, "parse_known_args",
                       parse(real_parse_known, lambda result: _Parsed(*result)))
            run()
    except _Parsed as parsed:
        return parsed.namespace, parsed.extras
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return argparse.Namespace(), []
        raise CommandError(f"{what} refuses its arguments: {out.getvalue().strip()}") from None
    except Exception as err:
        raise CommandError(f"{what} failed before parsing its arguments: {err!r} "
                           f"{out.getvalue().strip()}") from None
    finally:
        sys.argv = saved_argv
    raise CommandError(f"{what} returned without parsing arguments: {out.getvalue().strip()}")


def check_trainer(module: str, args: list[str]) -> None:
    """torchtitan's ConfigManager parses the TOML and the flags (tyro), as the trainer does
    first; the model name and flavor must then be registered."""
    from torchtitan.config.manager import ConfigManager
    from torchtitan.protocols.train_spec import get_train_spec

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            config = ConfigManager().parse_args(list(args))
    except SystemExit:
        raise CommandError(f"-m {module}: the trainer refuses its arguments:\n"
                           f"{out.getvalue().strip()}") from None
    except Exception as err:
        raise CommandError(f"-m {module}: the trainer's configuration fails: {err}") from None
    plugin = config.experimental.custom_import
    if module == "torchtitan.train" and not plugin:
        raise CommandError("-m torchtitan.train without [experimental] custom_import: the RAT "
                           "models are not registered (or use -m rat_plugin.train)")
    if plugin and importlib.util.find_spec(plugin) is None:
        raise CommandError(f"[experimental] custom_import = {plugin!r}: no such module")
    importlib.import_module(plugin or "rat_plugin.train_spec")
    try:
        flavors = get_train_spec(config.model.name).model_args
    except ValueError as err:
        raise CommandError(f"[model] name = {config.model.name!r}: {err}") from None
    if config.model.flavor not in flavors:
        raise CommandError(f"[model] flavor = {config.model.flavor!r} is not one of "
                           f"{sorted(flavors)}")


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out):
            namespace = get_args_parser().parse_args(args)
    except SystemExit:
        raise CommandError(f"torchrun refuses its arguments: {out.getvalue().strip()}") from None
    script, script_args = namespace.training_script, namespace.training_script_args
    if namespace.module:
        return check_module(script, script_args)
    if namespace.no_python:
        return check_argv([script, *script_args])
    return check_script(script, script_args)


def check_pytest(args: list[str]) -> None:
    from _pytest.config import UsageError, get_config

    try:
        namespace = get_config()._parser.parse(list(args))
    except UsageError as err:
        raise CommandError(f"pytest refuses its arguments: {err}") from None
    for path in namespace.file_or_dir:
        if not (REPO / path.split("::")[0]).exists():
            raise CommandError(f"pytest {path}: no such test file")


def check_console_script(name: str, args: list[str]) -> None:
    [entry] = importlib.metadata.entry_points(group="console_scripts", name=name) or [None]
    if entry is None:
        raise CommandError(f"`{name}`: no installed package provides this command (no console "
                           "script of that name), and it is not in SHELL_ONLY")
    if entry.module == "torch.distributed.run":
        return check_torchrun(args)
    if entry.module in TRAINERS:
        return check_trainer(entry.module, args)
    if entry.module.split(".")[0] == "pytest":
        return check_pytest(args)
    group = click_command(entry.module)
    if group is not None:
        return check_click(name, group, args)
    parse_only(entry.load(), [name, *args], name)


def click_command(module: str):
    """The click command a console script's module holds (a typer app's included), or None."""
    try:
        import click
    except ImportError:
        return None
    values = list(vars(importlib.import_module(module)).values())
    with contextlib.suppress(ImportError):
        import typer
        import typer.main

        values = [typer.main.get_command(v) if isinstance(v, typer.Typer) else v for v in values]
    found = [v for v in values if isinstance(v, click.Command)]
    groups = [v for v in found if isinstance(v, click.Group)]
    return (groups or found or [None])[0]


def check_click(name: str, command, args: list[str]) -> None:
    """click's own parse of each (sub)command's arguments, without invoking any."""
    import click

    try:
        context = command.make_context(name, list(args))
        while isinstance(command, click.Group):
            protected = (context._protected_args if hasattr(context, "_protected_args")
                         else context.protected_args)  # click < 8.2
            rest = [*protected, *context.args]
            if not rest:
                break
            sub_name, command, rest = command.resolve_command(context, rest)
            context = command.make_context(sub_name, rest, parent=context)
    except click.UsageError as err:
        raise CommandError(f"{name} refuses its arguments: {err.format_message()}") from None


def check_pip(args: list[str]) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for arg in args:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        for extra in match.group(1).split(",") if match else []:
            if extra not in extras:
                raise CommandError(f"pip install {arg}: pyproject.toml has no extra {extra!r} "
                                   f"(extras: {', '.join(extras)})")


def makefile_variables() -> frozenset:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z_]\w*)\s*[:?+]?=", text, flags=re.M))


def check_make(args: list[str], env: dict[str, str]) -> None:
    variables = makefile_variables()
    check_environment(env, variables)
    for arg in args:
        name = re.match(r"^([A-Za-z_]\w*)=", arg)
        if name and name.group(1) not in variables:
            raise CommandError(f"make {arg}: the Makefile has no variable {name.group(1)} "
                               f"(it has {', '.join(sorted(variables))})")
    # A make of our own, not a sub-make of the one running the tests (`make test` in CI): a
    # sub-make prefixes "make[1]:" and prints the directories it enters.
    outer = {"MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR"}
    clean = {k: v for k, v in os.environ.items() if k not in outer}
    result = subprocess.run(["make", "-n", *args], cwd=REPO, env=clean | env,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise CommandError(f"make -n {' '.join(args)}: {result.stderr.strip()}")
    recipe = result.stdout.replace("\\\n", " ")
    variables_seen: dict[str, str] = {}
    for line in recipe.splitlines():
        if line.strip():
            try:
                check_line(" ".join(line.split()), variables_seen)
            except CommandError as err:
                raise CommandError(f"make {' '.join(args)} runs `{line.strip()}`: {err}") from None


# ---- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ALL, ids=str)
def test_command_exists_and_parses(command: Command):
    variables: dict[str, str] = {}
    for earlier in ALL[:ALL.index(command)]:  # the block's assignments before this line
        if earlier.where.split(":")[0] == command.where.split(":")[0]:
            with contextlib.suppress(CommandError):
                simple_commands(earlier.text, variables)
    try:
        check_line(command.text, variables)
        problem = None
    except CommandError as err:
        problem = str(err)
    if problem:
        pytest.fail(f"{command.where}: `{command.text}`\n  {problem}", pytrace=False)


def test_commands_run_for_real_are_in_the_readme_and_their_tests_exist():
    texts = {c.bare for c in ALL}
    for text, (test, _) in RUN_FOR_REAL.items():
        assert text in texts, f"RUN_FOR_REAL lists `{text}`, which no document has any more"
        path, _, name = test.partition("::")
        assert (REPO / path).is_file(), test
        assert not name or re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), test


@pytest.mark.parametrize("line,error", [
    ("huggingface-cli download x", "`huggingface-cli`: no installed package provides this command"),
    ("sbatch job.sh", "`sbatch`: no installed package provides this command"),
    ("hf download x --repo-type datasets", "hf refuses its arguments: Invalid value for"),
    ("hf downlaod x", "hf refuses its arguments: No such command 'downlaod'"),
    ("python tools/nothing.py --x", "python tools/nothing.py: no such file in the repository"),
    ("python -m rat_plugin.nothing", "python -m rat_plugin.nothing: no such module here"),
    ("python tools/retrieval.py --model m --bogus 1", "refuses its arguments: error: "
     "unrecognized arguments: --bogus 1"),
    ("python -m rat_plugin.generate --model m --prompt x --dtype bf32", "argument --dtype: "
     "invalid choice: 'bf32'"),
    ("python -m rat_plugin.eval --model rat --tasks x --batch_sise 3", "unrecognized "
     "arguments: --batch_sise 3"),
    ("torchrun --nodes=4 -m torchtitan.train", "torchrun refuses its arguments"),
    ("torchrun --nproc_per_node=8 -m torchtitan.train --job.config_file "
     "train_configs/rat_1p3b.toml --training.stepz 200", "Unrecognized options: --training.stepz"),
    ("torchrun --nproc_per_node=8 -m torchtitan.train --job.config_file "
     "train_configs/rat_1p3b.toml --model.flavor 2B", "[model] flavor = '2B' is not one of"),
    ("torchrun -m torchtitan.train --job.config_file train_configs/nothing.toml",
     "the trainer's configuration fails"),
    ("python tools/dry_run.py train_configs/rat_1p3b.toml -- --training.stepz 3",
     "Unrecognized options: --training.stepz"),
    ("srun torchrun --nnodes=$NODES -m torchtitan.train", "$NODES has no sample value"),
    ("env RAT_KERNELZ=torch python -m rat_plugin.train", "RAT_KERNELZ is read nowhere"),
    ("make train-debg", "make -n train-debg: make: *** No rule to make target 'train-debg'"),
    ("make train-debug ARG=--checkpoint.enable", "the Makefile has no variable ARG"),
    ("make train-debug ARGS=--checkpoint.enabel", "Unrecognized options: --checkpoint.enabel"),
    ("make train-debug CONFIG=train_configs/nothing.toml", "the trainer's configuration fails"),
    ("pip install -e '.[gpuu]'", "pyproject.toml has no extra 'gpuu'"),
    ("RAT_KERNEL=torch python -m rat_plugin.generate --model m --prompt x",
     "environment variable RAT_KERNEL is read nowhere"),
    ("python -m pytest -q tests/test_nothing.py", "pytest tests/test_nothing.py: no such test"),
    ("python -m pytest --bogus", "pytest refuses its arguments"),
])
def test_a_wrong_command_fails_naming_what_is_wrong(line, error):
    """The checker's own oracle: commands with one mistake each."""
    with pytest.raises(CommandError) as err:
        check_line(line, {})
    assert error in str(err.value), str(err.value)

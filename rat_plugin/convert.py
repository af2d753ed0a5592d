"""Checkpoint conversion: torchtitan DCP step folder <-> standalone model folder.

A standalone folder holds ``model.safetensors`` (the tied head stored once, as
``tok_embeddings.weight``), ``config.json`` (model kind, every ``RATModelArgs`` field, dtype) and,
when given, the tokenizer files. Reading a DCP checkpoint needs no process group and no
torchtitan: only the model entries are loaded, optimizer and trainer states are skipped.
"""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from rat_plugin.atomic import atomic_dir, recover
from rat_plugin.folder import (
    CONFIG_FILE,
    CONFIG_RECORD,
    DTYPES,
    EMBEDDING,
    TIED_HEAD,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    ModelFolderError,
    checked_config,
    config_record,
    dtype_name,
    expected_shapes,
    folder_config,
    listing,
    read_config,
    shape_problems,
    weight_problem,
)
from rat_plugin.model import FLAVORS, MODEL_KINDS, RATModelArgs, make_args

MODEL_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.")
# Top-level entries of a full torchtitan checkpoint besides the (flattened) model.
TRAINER_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
# Written beside a DCP seed's files, so --force can tell our seeds from torchtitan's saves.
SEED_MARKER = "rat_seed.json"


class ConversionError(RuntimeError):
    """A conversion problem with a one-line explanation of the fix."""


@dataclass
class ModelSpec:
    """What the checkpoint holds and how we learnt it."""

    kind: str
    flavor: str | None
    args: RATModelArgs
    source: str  # "config <path>", "command line" or "checkpoint shapes"


# ----------------------------------------------------------------------------- DCP reading


def read_dcp_shapes(step_dir: str | os.PathLike) -> dict[str, TensorStorageMetadata]:
    """The model entries of a DCP checkpoint (name -> metadata), checking the other entries."""
    path = Path(step_dir)
    if not path.is_dir():
        raise ConversionError(
            f"checkpoint folder {path} does not exist: pass a step folder such as "
            "{dump_folder}/{checkpoint.folder}/step-N"
        )
    if not (path / ".metadata").is_file():
        steps = sorted(
            (p for p in path.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
        )
        hint = f": did you mean {steps[-1]}?" if steps else " (no .metadata file)"
        raise ConversionError(f"{path} is not a DCP checkpoint step folder{hint}")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # unpickling errors come in many types
        raise ConversionError(
            f"cannot read {path / '.metadata'} ({type(err).__name__}: {err}): "
            "the checkpoint is corrupt or was not fully written"
        ) from None
    entries = metadata.state_dict_metadata
    model = {k: v for k, v in entries.items() if k.startswith(MODEL_PREFIXES)}
    unknown = [
        k for k in entries if k not in model and k.split(".", 1)[0] not in TRAINER_STATES
    ]
    if unknown:
        raise ConversionError(
            f"{path} has entries that are neither RAT model weights nor torchtitan trainer "
            f"states: {listing(unknown)}; is this a checkpoint of another model?"
        )
    if not model:
        raise ConversionError(f"{path} holds no model weights (keys: {listing(entries)})")
    bad = [k for k, v in model.items() if not isinstance(v, TensorStorageMetadata)]
    if bad:
        raise ConversionError(f"{path}: model entries that are not tensors: {listing(bad)}")
    return model


def check_shapes(args: RATModelArgs, shapes: dict[str, torch.Size], where: str) -> None:
    """Raise a ConversionError listing missing, unknown and mis-shaped weights."""
    problems = shape_problems(args, shapes)
    if problems:
        raise ConversionError(
            f"{where} does not match the model {args}: {problems}. "
            "Check --config / --model-name / --flavor"
        )


def load_dcp_model(step_dir: str | os.PathLike, names: dict[str, TensorStorageMetadata]) -> dict:
    """Read just the model tensors ``names`` from a DCP checkpoint, in their stored dtype."""
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in names.items()}
    try:
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise ConversionError(
            f"reading the weights of {step_dir} failed ({_reason(err)}): the checkpoint is "
            "corrupt or incomplete"
        ) from None
    return state


def refuse_bad_weights(state: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    problem = weight_problem(state)
    if problem:
        raise ConversionError(
            f"{where}: {problem}: the checkpoint is corrupt or training diverged; "
            "convert an earlier checkpoint"
        )


def _reason(err: BaseException) -> str:
    """One line for an exception; DCP wraps each rank's failure in a CheckpointException."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]  # (exception, traceback) of the first rank
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ----------------------------------------------------------------------------- model spec


def spec_from_config(
    toml_path: str | os.PathLike | None,
    model_name: str | None = None,
    flavor: str | None = None,
    seq_len: int | None = None,
) -> ModelSpec | None:
    """Model kind and flavor from a training TOML (read with tomli), CLI values winning."""
    values: dict = {}
    source = "command line"
    if toml_path is not None:
        import tomli

        try:
            with open(toml_path, "rb") as f:
                values = tomli.load(f)
        except FileNotFoundError:
            raise ConversionError(f"training config {toml_path} does not exist") from None
        except OSError as err:  # a folder, no permission, a symlink loop
            raise ConversionError(
                f"cannot read training config {toml_path} ({err.strerror or err}): pass the "
                "TOML file the run was trained with"
            ) from None
        except (tomli.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConversionError(f"training config {toml_path} is not valid TOML: {err}") from None
        overridden = model_name or flavor or seq_len
        source = f"config {toml_path}" + (" + command line" if overridden else "")
    model, training = (_table(values, name, toml_path) for name in ("model", "training"))
    model_name = model_name or model.get("name")
    flavor = flavor or model.get("flavor")
    seq_len = seq_len if seq_len is not None else training.get("seq_len")
    for name, value in (("[model] name", model_name), ("[model] flavor", flavor)):
        if value is not None and not isinstance(value, str):
            raise ConversionError(f"{name} = {value!r} in {toml_path}: give a string")
    if model_name is None and flavor is None:
        return None
    if model_name is None or flavor is None:
        raise ConversionError(
            f"got model name {model_name!r} and flavor {flavor!r}: give both "
            "(--model-name and --flavor, or a --config naming them)"
        )
    if model_name not in MODEL_KINDS:
        raise ConversionError(
            f"model {model_name!r} is not a RAT model kind: choose one of {sorted(MODEL_KINDS)}"
        )
    if flavor not in FLAVORS:
        raise ConversionError(f"unknown flavor {flavor!r}: choose one of {list(FLAVORS)}")
    args = make_args(model_name, flavor)
    if seq_len is not None:
        try:
            if not isinstance(seq_len, int) or isinstance(seq_len, bool):
                raise ValueError(f"seq_len={seq_len!r} must be an integer")
            args.check_seq_len(seq_len)
        except ValueError as err:
            raise ConversionError(
                f"{err} (--seq-len or [training] seq_len, recorded as max_seq_len)"
            ) from None
        args.max_seq_len = seq_len
    return ModelSpec(model_name, flavor, args, source)


def _table(values: dict, name: str, toml_path) -> dict:
    table = values.get(name, {})
    if not isinstance(table, dict):
        raise ConversionError(f"{name} = {table!r} in {toml_path}: [{name}] must be a table")
    return table


def tokenizer_from_config(toml_path: str | os.PathLike, log=print) -> str | None:
    """The ``[model] hf_assets_path`` folder of a training TOML, if it holds a tokenizer.json.

    The path is relative to where training ran: tried from the current folder, then from the
    TOML's folder and its parent (configs usually live in ``train_configs/``).
    """
    import tomli

    with open(toml_path, "rb") as f:
        folder = tomli.load(f).get("model", {}).get("hf_assets_path")
    if not folder:
        return None
    config_dir = Path(toml_path).resolve().parent
    for base in (Path.cwd(), config_dir, config_dir.parent):
        if (base / folder / "tokenizer.json").is_file():
            return str(base / folder)
    log(f"tokenizer: [model] hf_assets_path={folder} not found, none copied (pass --tokenizer DIR)")
    return None


def fitting_models(
    shapes: dict[str, torch.Size], kinds=tuple(MODEL_KINDS)
) -> list[tuple[str, str, RATModelArgs]]:
    """Every (kind, flavor, args) among ``kinds`` whose weights have exactly these shapes."""
    fits = []
    for kind in kinds:
        for flavor in FLAVORS:
            args = make_args(kind, flavor)
            if shape_problems(args, shapes) is None:
                fits.append((kind, flavor, args))
    return fits


def only_fit(shapes: dict[str, torch.Size], kinds, where, hint: str):
    """The one (kind, flavor, args) among ``kinds`` whose weights have these shapes. Several:
    ``hint`` says how to choose; none: the nearest flavor and how it differs (no flag helps)."""
    fits = fitting_models(shapes, kinds)
    if len(fits) == 1:
        return fits[0]
    if fits:
        found = ", ".join(f"{k}/{f}" for k, f, _ in fits)
        raise ConversionError(
            f"cannot tell the model from the checkpoint shapes (matching kind/flavor: {found}): "
            f"{hint}"
        )

    def differences(candidate) -> int:
        expected = expected_shapes(candidate[2])
        return sum(tuple(shapes.get(k, ())) != tuple(v) for k, v in expected.items()
                   if k != TIED_HEAD) + sum(k not in expected for k in shapes)

    kind, flavor, args = min(((k, f, make_args(k, f)) for k in kinds for f in FLAVORS),
                             key=differences)
    raise ConversionError(
        f"{where}: its shapes fit no model here: the nearest, {kind}/{flavor}, has "
        f"{shape_problems(args, shapes)}; models of other sizes cannot be converted"
    )


def spec_from_shapes(shapes: dict[str, torch.Size], where) -> ModelSpec:
    """Infer kind and flavor from weight shapes; raise unless exactly one (kind, flavor) fits.

    Chunk size, window and RoPE base leave no trace in the shapes: they are the flavor's.
    """
    kind, flavor, args = only_fit(shapes, MODEL_KINDS, where,
                                  "pass --config TRAIN.toml or --model-name and --flavor")
    return ModelSpec(kind, flavor, args, "checkpoint shapes")


# ----------------------------------------------------------------------------- writing


def check_output(
    src: str | os.PathLike, out: str | os.PathLike, force: bool, source: str, written_by_us,
    log=print, reads=(),
) -> None:
    """Refuse an output that is, lies inside or contains the source (whatever ``force``), and
    an existing output unless ``written_by_us(out)`` says this tool wrote it and ``force`` is
    given: nothing but a previous export is ever replaced. What a killed write left is
    repaired first (keeping the source and the other folders the run ``reads``), so the check
    sees the folder the path really holds."""
    src, out = Path(src).resolve(), Path(out).resolve()
    relation = (
        "is" if out == src else "is inside" if src in out.parents
        else "contains" if out in src.parents else None
    )
    if relation:
        raise ConversionError(
            f"output {out} {relation} the {source} {src}: choose an output folder outside it"
        )
    if out.parent.is_dir():
        try:
            recover(out, log, (src, *filter(None, reads)))
        except OSError as err:
            raise ConversionError(f"cannot repair {out} ({err}): {err.filename} is in the way")\
                from None
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or not written_by_us(out):
        raise ConversionError(
            f"{out} exists and is not a folder this tool wrote, so even --force does not "
            "replace it: remove it yourself or choose another output folder"
        )
    if not force:
        raise ConversionError(f"{out} already exists: pass --force to replace it")


def is_model_folder(folder: Path) -> bool:
    """A model folder this tool wrote: its config.json, and its configuration record in the
    weights (another model's config.json + model.safetensors is not ours to replace)."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
            record = (f.metadata() or {}).get(CONFIG_RECORD)
    except Exception:  # missing or unreadable files
        return False
    return isinstance(config, dict) and config.get("model_kind") in MODEL_KINDS and bool(record)


def is_dcp_seed(folder: Path) -> bool:
    """A DCP seed this tool wrote (model weights and its marker), not a torchtitan save."""
    try:
        entries = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception:  # no or unreadable .metadata
        return False
    return (folder / SEED_MARKER).is_file() and all(k.startswith(MODEL_PREFIXES) for k in entries)


@contextmanager
def output_folder(out: Path, force: bool, log, reads=()) -> Iterator[Path]:
    """``atomic_dir`` (keeping the folders the run ``reads``) with file-system errors (read-only
    folder, disk full) as one line; the writers report them in their own types (safetensors,
    DCP)."""
    from safetensors import SafetensorError

    try:
        with atomic_dir(out, force, log, filter(None, reads)) as tmp:
            yield tmp
    except (OSError, SafetensorError, CheckpointException) as err:
        if isinstance(err, CheckpointException):  # DCP: the first rank's failure
            err = next(iter(err.failures.values()))[0]
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConversionError(
            f"cannot write {out} ({reason.strip().splitlines()[0]}): choose a writable output "
            "folder with enough free space"
        ) from None


def copy_tokenizer(tokenizer_dir: str | os.PathLike, folder: Path) -> list[str]:
    src = Path(tokenizer_dir)
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(
            f"{src} has no tokenizer.json: pass the folder of [model] hf_assets_path"
        )
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
            copied.append(name)
    return copied


def dcp_to_standalone(
    step_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: ModelSpec | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    log=print,
) -> ModelSpec:
    """Export a torchtitan DCP step folder to ``out_dir`` (atomically). Returns what was learnt.
    A seed of ours gives back the folder it was made from (its settings are in SEED_MARKER)."""
    out = Path(out_dir)
    check_output(step_dir, out, force, "source checkpoint", is_model_folder, log, [tokenizer_dir])
    names = read_dcp_shapes(step_dir)
    shapes = {k: m.size for k, m in names.items()}
    folder = seed_folder(step_dir)
    if folder is not None and spec is None:
        args = RATModelArgs(**folder["args"])
        spec = ModelSpec(folder["model_kind"], folder.get("flavor"), args, SEED_MARKER)
    spec = spec or spec_from_shapes(shapes, step_dir)
    log(f"model: kind={spec.kind} flavor={spec.flavor} (from {spec.source})")
    check_shapes(spec.args, shapes, str(step_dir))
    state = load_dcp_model(step_dir, names)
    refuse_bad_weights(state, step_dir)
    head = state.pop(TIED_HEAD, None)
    if head is not None and not torch.equal(head, state[EMBEDDING]):
        raise ConversionError(
            f"{step_dir}: output.weight differs from tok_embeddings.weight, but RAT models tie them"
        )
    if folder is not None:
        dtype = dtype or DTYPES[folder.get("dtype", "fp32")]
    add_bos = True if folder is None else folder.get("add_bos", True)
    write_folder(state, spec, out, dtype, force, tokenizer_dir, add_bos, log, reads=[step_dir])
    return spec


def seed_folder(step_dir: str | os.PathLike) -> dict | None:
    """The settings (``folder_config``) of the model folder a DCP seed of ours was made from;
    None for any other DCP folder (and seeds of earlier versions, which kept none)."""
    path = Path(step_dir) / SEED_MARKER
    if not path.is_file():
        return None
    try:
        folder = json.loads(path.read_text()).get("folder")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is invalid ({err}): write the seed again") from None
    if folder is not None:
        try:
            checked_config(folder, path)
        except ModelFolderError as err:
            raise ConversionError(str(err)) from None
    return folder


def write_folder(
    state: dict[str, torch.Tensor],
    spec: ModelSpec,
    out: Path,
    dtype: torch.dtype | None = None,
    force: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    add_bos: bool = True,
    log=print,
    reads=(),
) -> None:
    """Write checked weights (the tied head dropped) as a standalone folder, atomically
    (keeping the tokenizer folder and the other folders the run ``reads``)."""
    from safetensors.torch import save_file

    dtype = dtype or folder_dtype(state[EMBEDDING].dtype, log)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    config = folder_config(spec.kind, spec.flavor, spec.args, dtype, add_bos)
    metadata = {"format": "pt", CONFIG_RECORD: config_record(config)}
    with output_folder(out, force, log, [tokenizer_dir, *reads]) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            log(f"tokenizer: copied {', '.join(copy_tokenizer(tokenizer_dir, tmp))}")
    nparams = sum(v.numel() for v in state.values())
    log(f"wrote {out} ({nparams:,} parameters, {dtype_name(dtype)})")


def folder_dtype(dtype: torch.dtype, log=print) -> torch.dtype:
    """``dtype`` where model folders hold it (the loader's DTYPES), else fp32, saying so."""
    if dtype in DTYPES.values():
        return dtype
    log(f"dtype: the weights are {dtype_name(dtype)}, which model folders do not hold (fp32, "
        "bf16, fp16): written as fp32 (--dtype chooses)")
    return torch.float32


def standalone_to_dcp(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    force: bool = False,
    log=print,
) -> None:
    """Write a model-only DCP checkpoint (flat FQNs, fp32 unless ``dtype``) of a standalone folder.

    Point torchtitan's ``checkpoint.initial_load_path`` at ``out_dir`` with
    ``checkpoint.initial_load_model_only = true`` to seed training from it.
    """
    from safetensors.torch import load_file

    out = Path(out_dir)
    check_output(model_dir, out, force, "source model folder", is_dcp_seed, log)
    try:
        config, args = read_config(model_dir)
        folder = folder_config(config["model_kind"], config.get("flavor"), args,
                               DTYPES[config.get("dtype", "fp32")], config.get("add_bos", True))
    except ModelFolderError as err:
        raise ConversionError(str(err)) from None
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConversionError(f"{model_dir} has no {WEIGHTS_FILE}: convert the checkpoint again")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConversionError(f"cannot read {weights} ({err}): convert the checkpoint again") \
            from None
    check_shapes(args, {k: v.shape for k, v in state.items()}, str(weights))
    refuse_bad_weights(state, weights)
    write_dcp_seed(state, out, dtype, force, folder, log, reads=[model_dir])


def write_dcp_seed(
    state: dict[str, torch.Tensor],
    out: Path,
    dtype: torch.dtype | None,
    force: bool,
    folder: dict,
    log=print,
    reads=(),
) -> None:
    """Write checked weights as a model-only DCP checkpoint (fp32 unless ``dtype``), atomically.
    ``folder``: the settings of the model folder the weights come from (``folder_config``),
    kept in SEED_MARKER, so converting the seed back gives that folder."""
    dtype = dtype or torch.float32
    state = {k: v.to(dtype) for k, v in state.items()}
    state[TIED_HEAD] = state[EMBEDDING]  # torchtitan saves both names
    kind = folder["model_kind"]
    marker = {"model_kind": kind, "dtype": dtype_name(dtype), "folder": folder}
    with output_folder(out, force, log, reads) as tmp:
        dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        (tmp / SEED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    log(f"wrote DCP checkpoint {out} (kind={kind}, {dtype_name(dtype)})")

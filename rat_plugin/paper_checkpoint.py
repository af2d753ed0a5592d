"""Checkpoints of the paper's code (CLAIRE-Labo/RAT): read without executing the pickle, map to
``RATModel`` names, export as a standalone folder or a DCP seed (no torchtitan import).

The file is a ``torch.save`` dict: weights under ``task`` (keys possibly prefixed ``_orig_mod.``),
the run's configuration under ``config`` (an ``easydict.EasyDict``), plus ``optimizer``,
``lr_scheduler`` and ``step``. The weights map one to one; the fused input projections split by
rows (z, v, g, q, k for RAT, v, q, k for attention). The model math is the same, so an import
reproduces the source model's logits to rounding.
"""

import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from rat_plugin.convert import (
    ConversionError,
    ModelSpec,
    check_output,
    check_shapes,
    folder_dtype,
    is_model_folder,
    is_dcp_seed,
    only_fit,
    refuse_bad_weights,
    write_dcp_seed,
    write_folder,
)
from rat_plugin.folder import EMBEDDING, folder_config, listing
from rat_plugin.model import MODEL_KINDS, make_args

COMPILE_PREFIX = "_orig_mod."
PAPER_HEAD = "head.lm_head.weight"
# Paper name -> ours, for the weights that map one to one ({} is the layer index).
RENAMES = {
    "embedding.wte.weight": EMBEDDING,
    "backbone.ln.weight": "norm.weight",
    "backbone.layers.{}.seq_layer.input_norm.weight": "layers.{}.mixer_norm.weight",
    "backbone.layers.{}.seq_layer.gate_bias": "layers.{}.mixer.wg.bias",
    "backbone.layers.{}.seq_layer.out_proj.weight": "layers.{}.mixer.wo.weight",
    "backbone.layers.{}.hidden_layer.fc1.weight": "layers.{}.feed_forward.w1.weight",
    "backbone.layers.{}.hidden_layer.fc2.weight": "layers.{}.feed_forward.w2.weight",
    "backbone.layers.{}.hidden_layer.ln.weight": "layers.{}.ffn_norm.weight",
}
IN_PROJ = "backbone.layers.{}.seq_layer.in_proj.weight"
# Row blocks of the fused in_proj, in order: RAT (D, D, D, G*d, G*d), attention (D each).
RAT_ROWS = ("wz", "wv", "wg", "wq", "wk")
ATTENTION_ROWS = ("wv", "wq", "wk")


class ConfigDict(dict):
    """What an ``easydict.EasyDict`` of the paper's configuration unpickles to."""


def _opaque(name: str) -> type:
    """A stand-in for any other pickled class or function: it absorbs whatever the pickle
    builds with it and runs nothing (optimizer and scheduler extras are never used)."""

    class Opaque:
        pickled_name = name

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

        def __setitem__(self, key, value):
            pass

        def append(self, item):
            pass

        def extend(self, items):
            pass

        def __repr__(self) -> str:
            return f"a pickled {name}"

    return Opaque


def _rebuild_tensor_with_attributes(rebuild, tensor_type, args, attributes):
    """A tensor pickled with Python attributes (FSDP marks state-dict tensors
    ``_has_been_cloned``): rebuilt as a plain tensor by an allowed function, attributes dropped."""
    from torch import _utils

    if rebuild not in (_utils._rebuild_tensor_v2, _utils._rebuild_tensor_v3):
        name = getattr(rebuild, "pickled_name", rebuild)
        raise pickle.UnpicklingError(f"a tensor rebuilt by {name} is not allowed")
    if tensor_type not in (torch.Tensor, torch.nn.Parameter):
        name = getattr(tensor_type, "pickled_name", tensor_type)
        raise pickle.UnpicklingError(f"a tensor of type {name} is not allowed")
    return rebuild(*args)


def _allowed_globals() -> dict:
    """The only real objects a pickle may name: tensor rebuilding, containers, dtypes."""
    from torch import _utils

    allowed = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor_v2": _utils._rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _utils._rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _utils._rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_tensor_with_attributes,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "_codecs.encode": __import__("codecs").encode,
        "easydict.EasyDict": ConfigDict,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


class _Unpickler(pickle.Unpickler):
    """Resolves names only to ``_allowed_globals``; anything else becomes an inert stand-in."""

    allowed = None

    def find_class(self, module: str, name: str):
        if _Unpickler.allowed is None:
            _Unpickler.allowed = _allowed_globals()
        return _Unpickler.allowed.get(f"{module}.{name}") or _opaque(f"{module}.{name}")


class _RestrictedPickle:
    """The ``pickle_module`` torch.load uses: storages come from torch, names from the list."""

    __name__ = "rat_plugin.paper_checkpoint"
    Unpickler = _Unpickler

    @staticmethod
    def load(file, **kwargs):
        return _Unpickler(file, **kwargs).load()


def read_paper_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], object]:
    """(weights without the compile prefix, configuration as pickled: None when absent) of a
    checkpoint file."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(
            f"{path} is a folder: --from-paper takes the .pth file the paper's code saved"
        )
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_RestrictedPickle, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch.load raises many types for foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConversionError(
            f"{path} is not a torch.save checkpoint ({type(err).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or "task" not in ckpt:
        found = listing(map(str, ckpt)) if isinstance(ckpt, dict) else repr(ckpt)[:80]
        raise ConversionError(
            f"{path} has no 'task' weights, so it is not a checkpoint of the paper's code "
            f"(found: {found})"
        )
    task = ckpt["task"]
    if not isinstance(task, dict):
        raise ConversionError(f"{path}: 'task' is {task!r}, not a dict of weights")
    unnamed = [k for k in task if not isinstance(k, str)]
    if unnamed:
        raise ConversionError(f"{path}: 'task' keys that are not weight names: "
                              f"{listing(map(repr, unnamed))}")
    state = {k.replace(COMPILE_PREFIX, ""): v for k, v in task.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: 'task' entries that are not tensors: {listing(bad)}")
    return state, ckpt.get("config")


def map_weights(state: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """The paper's weights under RATModel names (the tied head dropped after a check)."""
    state = dict(state)
    head = state.pop(PAPER_HEAD, None)
    embedding = state.get("embedding.wte.weight")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ConversionError(
            f"{where}: {PAPER_HEAD} differs from embedding.wte.weight, but RAT models tie them"
        )
    if embedding is None or embedding.dim() != 2:
        raise ConversionError(
            f"{where} has no embedding.wte.weight matrix: it is not a language model of the "
            "paper's code"
        )
    dim = embedding.shape[1]
    mapped, unknown = {}, []
    for key, value in state.items():
        abstract = re.sub(r"\.(\d+)\.", ".{}.", key, count=1)
        layer = re.search(r"\.(\d+)\.", key)
        if abstract == IN_PROJ:
            mapped.update(_split_in_proj(value, dim, layer.group(1), where))
        elif abstract in RENAMES:
            mapped[RENAMES[abstract].format(layer.group(1) if layer else "")] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{where} holds weights that no RAT, RAT-SWA or attention model of the paper's code "
            f"has: {listing(unknown)}"
        )
    rnn = [k.split(".")[1] for k in mapped
           if k.endswith(".mixer.wg.bias") and k.replace("wg.bias", "wz.weight") not in mapped]
    if rnn:
        raise ConversionError(
            f"{where}: RNN layers of the paper's code (a gate bias and a 3D-row in_proj) at "
            f"layer(s) {', '.join(rnn)}, which no model here has (RAT layers have 3D + 2Gd rows)"
        )
    return mapped


def _split_in_proj(weight: torch.Tensor, dim: int, layer: str, where) -> dict:
    rows = weight.shape[0]
    if rows == 3 * dim:
        names, sizes = ATTENTION_ROWS, [dim] * 3
    elif rows > 3 * dim and (rows - 3 * dim) % 2 == 0:
        group_dim = (rows - 3 * dim) // 2
        names, sizes = RAT_ROWS, [dim, dim, dim, group_dim, group_dim]
    else:
        raise ConversionError(
            f"{where}: layer {layer}'s in_proj has {rows} rows, neither RAT's 3D + 2Gd nor "
            f"attention's 3D (D={dim}): is this a RAT model of the paper's code?"
        )
    blocks = torch.split(weight, sizes, dim=0)
    return {f"layers.{layer}.mixer.{n}.weight": b for n, b in zip(names, blocks)}


class _Config:
    """Typed reads of the run's configuration by dotted path (None where absent): a value of
    the wrong type is refused in one line naming it."""

    KINDS = {
        "section": ("a section", lambda v: isinstance(v, dict)),
        "name": ("a name", lambda v: isinstance(v, str)),
        "count": ("a positive integer",
                  lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
        "number": ("a positive finite number", lambda v: isinstance(v, (int, float))
                   and not isinstance(v, bool) and 0 < v < math.inf),
    }

    def __init__(self, config: dict, where):
        self.config, self.where = config, where

    def __call__(self, path: str, kind: str):
        value, keys = self.config, path.split(".")
        for depth, key in enumerate(keys):
            if not isinstance(value, dict):
                self._refuse(".".join(keys[:depth]), value, "section")
            value = value.get(key)
            if value is None:
                return None
        if not self.KINDS[kind][1](value):
            self._refuse(path, value, kind)
        return value

    def _refuse(self, path: str, value, kind: str):
        raise ConversionError(
            f"{self.where}: {path}={value!r:.60} in the checkpoint's configuration must be "
            f"{self.KINDS[kind][0]}: is this a checkpoint of the paper's code, unedited?"
        )


def settings_from_config(config: dict, where) -> dict:
    """What shapes do not show, from the run's configuration: the mixers by layer parity, chunk
    size, window, RoPE base, training length and head size (None where absent), and the config
    path each came from."""
    read = _Config(config, where)
    backbone = "model.backbone"
    interleaved = read(f"{backbone}._name_", "name") == "sequence_interleave"
    even = f"{backbone}.seq_cell1" if interleaved else f"{backbone}.seq_cell"
    odd = f"{backbone}.seq_cell"
    for section in (even, odd, f"{backbone}.hidden_cell", "model.embedding.pe", "data"):
        read(section, "section")
    paths = {
        "even": (f"{even}._name_", "name"),
        "odd": (f"{odd}._name_" if interleaved else None, "name"),
        "chunk_size": (f"{even}.chunk_size", "count"),
        "swa_window": (f"{odd}.window_size" if interleaved else None, "count"),
        "rope_base": ("model.embedding.pe.base", "number"),
        "max_seq_len": ("data.seq_len", "count"),
        "head_dim": (f"{even}.d_head", "count"),
        "act_fn": (f"{backbone}.hidden_cell.act_fn", "name"),
        "interleave_step": (f"{backbone}.interleave_step" if interleaved else None, "count"),
    }
    settings = {k: path and read(path, kind) for k, (path, kind) in paths.items()}
    return {**settings, "paths": {k: path for k, (path, _) in paths.items()}}


KINDS_BY_MIXERS = {
    ("rat", None): "rat",
    ("rat", "local_attention"): "rat_swa",
    ("attention", None): "rat_attn",
    ("attention", "local_attention"): "rat_attn_swa",
}
# Settings the shapes do not show, as RATModelArgs fields.
SHAPELESS = ("chunk_size", "swa_window", "rope_base", "max_seq_len")


def paper_spec(state: dict[str, torch.Tensor], config, where, spec=None, log=print) -> ModelSpec:
    """Kind and flavor from the mapped shapes (and the configuration's mixers where shapes
    cannot tell), with chunk size, window, RoPE base and length from the configuration. Without
    a configuration (or one naming no chunk size or window) the flavor's are taken only when
    ``spec`` (--model-name / --flavor) names it."""
    if config is not None and not isinstance(config, dict):
        raise ConversionError(
            f"{where}: its 'config' is {config!r:.60}, not the run's configuration (a section): "
            "is this a checkpoint of the paper's code?"
        )
    settings = settings_from_config(config or {}, where)
    if settings["act_fn"] not in (None, "gelu"):
        raise ConversionError(
            f"{where}: the FFN uses {settings['act_fn']!r}, RAT models here use exact gelu"
        )
    if settings["interleave_step"] not in (None, 2):
        raise ConversionError(
            f"{where}: interleave_step={settings['interleave_step']!r} in the configuration, but "
            "the hybrids here alternate their two layer kinds (interleave_step 2)"
        )
    named = spec is not None
    if spec is None:
        spec = _spec_from_shapes(state, settings, where)
    overrides = {k: settings[k] for k in SHAPELESS if settings[k] is not None}
    if not spec.kind.endswith("_swa"):
        overrides.pop("swa_window", None)
    flavor = make_args(spec.kind, spec.flavor)
    missing = [k for k in SHAPELESS if k not in overrides and getattr(flavor, k) is not None
               and not (k == "chunk_size" and flavor.mixer != "rat")]
    if missing:
        _take_from_flavor(missing, spec, settings["paths"], config, named, where, log)
    try:
        args = make_args(spec.kind, spec.flavor, **overrides)
    except ValueError as err:
        raise ConversionError(f"{where}: the checkpoint's configuration: {err}") from None
    if settings["head_dim"] not in (None, args.head_dim):
        fix = ("pass the matching --flavor" if named else
               f"{spec.kind}/{spec.flavor} is the only flavor with these shapes, so a model of "
               "another head size cannot be imported")
        raise ConversionError(
            f"{where}: heads of {settings['head_dim']} channels ({settings['paths']['head_dim']})"
            f", but {spec.kind}/{spec.flavor} has {args.head_dim}: {fix}"
        )
    source = spec.source + (" + checkpoint config" if overrides else "")
    return ModelSpec(spec.kind, spec.flavor, args, source)


def _take_from_flavor(missing, spec: ModelSpec, paths: dict, config, named: bool, where, log):
    """Settings the configuration lacks come from the flavor when --model-name / --flavor name
    it (said in a line); otherwise refused where they change the model (all of them when there
    is no configuration; a missing RoPE base or length is the flavor's then too)."""
    if not named and config is None:
        raise ConversionError(
            f"{where} holds no configuration ('config'): its chunk size, window, RoPE base "
            "and training length leave no trace in the weights, so the import cannot know "
            "them: pass --model-name and --flavor to take that flavor's"
        )
    needed = [k for k in missing if k in ("chunk_size", "swa_window")]
    if not named and needed:
        names = ", ".join(f"{k} ({paths[k] or 'no local attention section'})" for k in needed)
        layers = "RAT" if needed[0] == "chunk_size" else "local attention"
        raise ConversionError(
            f"{where}: the checkpoint's configuration names no {names} for its {layers} "
            "layers: pass --model-name and --flavor to take that flavor's"
        )
    flavor = make_args(spec.kind, spec.flavor)
    taken = ", ".join(f"{k}={getattr(flavor, k)}" for k in missing)
    why = "no configuration" if config is None else "not in the configuration"
    log(f"{why}: {taken} are {spec.kind}/{spec.flavor}'s")


def _spec_from_shapes(state, settings: dict, where) -> ModelSpec:
    """The one (kind, flavor) whose weights have the shapes of ``state`` among the kinds the
    configuration's mixers allow."""
    mixers = (settings["even"], settings["odd"])
    if settings["even"] is not None and mixers not in KINDS_BY_MIXERS:
        raise ConversionError(
            f"{where}: layers of kinds {mixers} (even, odd) have no RAT model kind here: "
            f"supported are {sorted(KINDS_BY_MIXERS)}"
        )
    kinds = [KINDS_BY_MIXERS[mixers]] if mixers in KINDS_BY_MIXERS else list(MODEL_KINDS)
    kind, flavor, _ = only_fit({k: v.shape for k, v in state.items()}, kinds, where,
                               "pass --model-name and --flavor")
    return ModelSpec(kind, flavor, None, "checkpoint shapes")


def load_paper_model(path, spec: ModelSpec | None = None, log=print):
    """(ModelSpec, checked RATModel weights) of a checkpoint of the paper's code."""
    state, config = read_paper_checkpoint(path)
    refuse_bad_weights(state, path)  # first: a NaN in the tied pair is no "differs"
    state = map_weights(state, path)
    spec = paper_spec(state, config, path, spec, log)
    log(f"model: kind={spec.kind} flavor={spec.flavor} (from {spec.source}; paper's code)")
    check_shapes(spec.args, {k: v.shape for k, v in state.items()}, str(path))
    return spec, state


def paper_to_standalone(
    path, out_dir, spec: ModelSpec | None = None, dtype: torch.dtype | None = None,
    force: bool = False, tokenizer_dir=None, log=print,
) -> ModelSpec:
    """Export a checkpoint of the paper's code as a standalone folder, recording its data
    convention (no BOS, EOS after each document): text prompts get no BOS."""
    out = Path(out_dir)
    check_output(path, out, force, "source checkpoint", is_model_folder, log, [tokenizer_dir])
    spec, state = load_paper_model(path, spec, log)
    write_folder(state, spec, out, dtype, force, tokenizer_dir, add_bos=False, log=log)
    return spec


def paper_to_dcp(
    path, out_dir, spec: ModelSpec | None = None, dtype: torch.dtype | None = None,
    force: bool = False, log=print,
) -> ModelSpec:
    """A model-only DCP seed (``checkpoint.initial_load_path``) of a paper-code checkpoint."""
    out = Path(out_dir)
    check_output(path, out, force, "source checkpoint", is_dcp_seed, log)
    spec, state = load_paper_model(path, spec, log)
    # A seed holds weights only: the run that loads it builds the flavor's model as it stands.
    flavor = make_args(spec.kind, spec.flavor)
    changed = [f"{name}={getattr(spec.args, name)} (the flavor has {getattr(flavor, name)})"
               for name in ("chunk_size", "swa_window", "rope_base")
               if getattr(spec.args, name) != getattr(flavor, name)]
    if changed:
        raise ConversionError(
            f"{path}: the checkpoint's model has {', '.join(changed)}, which a training config "
            f"of {spec.kind}/{spec.flavor} cannot set, so fine-tuning the seed would train "
            "another model: import it without --to-dcp (a standalone folder) instead"
        )
    dtype_back = folder_dtype(state[EMBEDDING].dtype, log=lambda _: None)  # of a folder back
    folder = folder_config(spec.kind, spec.flavor, spec.args, dtype_back, add_bos=False)
    write_dcp_seed(state, out, dtype, force, folder, log)
    return spec

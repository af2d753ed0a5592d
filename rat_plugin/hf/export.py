"""Transformers folders of RAT models: the ``--to-hf`` export of a standalone folder, and the
files that make torchtitan's HF last save one.

A folder holds the weights under ``RATForCausalLM``'s names, ``config.json`` (``RATConfig``,
with ``auto_map``), ``generation_config.json``, the generated code (``remote_code``) and the
tokenizer, so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
loads it where rat_plugin is not installed (and without ``trust_remote_code`` where
``rat_plugin.hf`` is imported). The export's ``model.safetensors`` records, in its metadata, the
configuration it was written with: ``from_pretrained`` warns about config.json fields edited
since, and ``--to-hf --force`` replaces only a folder carrying it.
"""

import json
import os
from pathlib import Path

from rat_plugin.convert import ConversionError, check_output, copy_tokenizer, output_folder
from rat_plugin.folder import (
    CONFIG_FILE,
    CONFIG_RECORD,
    WEIGHTS_FILE,
    ModelFolderError,
    config_record,
    to_hf_names,
)
from rat_plugin.generate.loading import load, load_tokenizer, special_token_ids
from rat_plugin.hf import remote_code
from rat_plugin.hf.configuration import RATConfig
from rat_plugin.hf.modeling import INDEX_FILE


def is_hf_folder(folder: Path) -> bool:
    """A folder ``folder_to_hf`` wrote: config.json of model type "rat" and the configuration
    record in model.safetensors' metadata (a ``save_pretrained`` copy, torchtitan's HF save or
    another tool's folder has none)."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
            record = (f.metadata() or {}).get(CONFIG_RECORD)
    except Exception:  # missing or unreadable files
        return False
    return isinstance(config, dict) and config.get("model_type") == RATConfig.model_type \
        and bool(record)


def folder_to_hf(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False, log=print
) -> None:
    """Write the model of a standalone folder (and its tokenizer) as a transformers folder.
    The tokenizer's EOS becomes the config's, and its BOS too when the model was trained with
    one (``add_bos``)."""
    out = Path(out_dir)
    check_output(model_dir, out, force, "source model folder", is_hf_folder, log)
    try:
        model = load(model_dir)
        has_tokenizer = (Path(model_dir) / "tokenizer.json").is_file()
        tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
        bos, eos = special_token_ids(model_dir, tokenizer) if tokenizer else (None, None)
    except ModelFolderError as err:
        raise ConversionError(str(err)) from None
    dtype = model.tok_embeddings.weight.dtype
    config = RATConfig.from_folder_config(model.config, dtype=dtype, eos_token_id=eos,
                                          bos_token_id=bos if model.config.get("add_bos", True)
                                          else None)
    state = {k: v.contiguous() for k, v in to_hf_names(model.state_dict()).items()}
    metadata = {"format": "pt", CONFIG_RECORD: config_record(config.folder_config())}
    with output_folder(out, force, log, reads=[model_dir]) as tmp:
        from safetensors.torch import save_file

        save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
        write_transformers_files(tmp, config, model_dir if tokenizer else None, log)
    log(f"wrote {out} (transformers model type {config.model_type!r}, {dtype}; load it with "
        "trust_remote_code=True where rat_plugin is not installed)")


def write_transformers_files(folder: Path, config: RATConfig, tokenizer_dir, log=print) -> None:
    """Everything of a transformers folder but the weights: config.json with ``auto_map``,
    generation_config.json, the generated code and (from ``tokenizer_dir``) the tokenizer."""
    from transformers import GenerationConfig

    config.auto_map = dict(remote_code.AUTO_MAP)
    config.architectures = ["RATForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    log(f"code: {', '.join(remote_code.write(folder))} (generated from rat_plugin)")
    if tokenizer_dir is not None:
        log(f"tokenizer: copied {', '.join(copy_tokenizer(tokenizer_dir, folder))}")
        encode_as_trained(folder, config.add_bos, log)


def complete_hf_save(folder: Path, config: RATConfig, tokenizer_dir, log=print) -> None:
    """Make torchtitan's HF save (shards and their index, no config) a transformers folder:
    the files of ``write_transformers_files``, and the configuration record in the index."""
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    index.setdefault("metadata", {})[CONFIG_RECORD] = config_record(config.folder_config())
    write_transformers_files(folder, config, tokenizer_dir, log)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, index_path)


def encode_as_trained(folder: Path, add_bos: bool, log=print) -> None:
    """Make ``AutoTokenizer`` encode text as the model was trained: BOS first exactly when the
    folder says ``add_bos``. The tokenizer files are copies in the export; a tokenizer.json
    without a post-processor adds nothing, and a Llama one always adds BOS. A model trained
    without BOS gets a tokenizer that names none, so lm_eval's ``hf`` model starts empty
    contexts and rolling windows with EOS, as the RAT paper's harness does."""
    from tokenizers import Tokenizer, processors

    path = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    bos, _ = special_token_ids(folder, tokenizer)
    adds_bos = bos is not None and tokenizer.encode("a").ids[:1] == [bos]
    if add_bos and bos is not None and not adds_bos:
        token = tokenizer.id_to_token(bos)
        template = processors.TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, bos)])
        old = tokenizer.post_processor
        tokenizer.post_processor = template if old is None else processors.Sequence([old, template])
        tokenizer.save(str(path))
    elif not add_bos and adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
        tokenizer.save(str(path))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config_path = folder / name
        if not config_path.is_file():
            continue
        config = json.loads(config_path.read_text())
        if name == "tokenizer_config.json":  # transformers' Llama tokenizer rebuilds from this
            config.update(add_bos_token=add_bos, add_eos_token=False)
        if not add_bos:
            config["bos_token"] = None
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    log(f"tokenizer: AutoTokenizer {'adds' if add_bos else 'adds and names no'} BOS, as in "
        "training")

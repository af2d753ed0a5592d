"""Export a standalone model folder as a transformers folder (``save_pretrained``)."""

import json
import os
from pathlib import Path

import torch

from rat_plugin.convert import ConversionError, check_output, copy_tokenizer, output_folder
from rat_plugin.folder import CONFIG_FILE, WEIGHTS_FILE, ModelFolderError
from rat_plugin.generate.loading import load, load_tokenizer, special_token_ids
from rat_plugin.hf.configuration import RATConfig
from rat_plugin.hf.modeling import RATForCausalLM


def is_hf_folder(folder: Path) -> bool:
    """A folder that ``folder_to_hf`` wrote (transformers config of model type "rat")."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == RATConfig.model_type \
        and (folder / WEIGHTS_FILE).is_file()


def folder_to_hf(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False, log=print
) -> None:
    """Write the model of a standalone folder (and its tokenizer) as a folder that
    ``AutoModelForCausalLM.from_pretrained`` loads once ``rat_plugin.hf`` is imported. The
    tokenizer's BOS/EOS become the config's token ids (generate() stops at EOS)."""
    out = Path(out_dir)
    check_output(model_dir, out, force, "source model folder", is_hf_folder, log)
    try:
        model = load(model_dir)
        tokenizer = load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() \
            else None
        bos, eos = special_token_ids(model_dir, tokenizer) if tokenizer else (None, None)
    except ModelFolderError as err:
        raise ConversionError(str(err)) from None
    dtype = model.tok_embeddings.weight.dtype
    config = RATConfig.from_folder_config(model.config, dtype=dtype, bos_token_id=bos,
                                          eos_token_id=eos)
    with torch.device("meta"):
        hf_model = RATForCausalLM(config)
    hf_model.model = model
    with output_folder(out, force, log, reads=[model_dir]) as tmp:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            log(f"tokenizer: copied {', '.join(copy_tokenizer(model_dir, tmp))}")
            encode_as_trained(tmp, config.add_bos, bos, log)
    log(f"wrote {out} (transformers model type {config.model_type!r}, {dtype})")


def encode_as_trained(folder: Path, add_bos: bool, bos: int | None, log=print) -> None:
    """Make ``AutoTokenizer`` encode text as the model was trained: BOS first exactly when the
    folder says ``add_bos``. The tokenizer files are copies in the export; a tokenizer.json
    without a post-processor adds nothing, and a Llama one always adds BOS."""
    from tokenizers import Tokenizer, processors

    path = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    adds_bos = bos is not None and tokenizer.encode("a").ids[:1] == [bos]
    if add_bos and bos is not None and not adds_bos:
        token = tokenizer.id_to_token(bos)
        template = processors.TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, bos)])
        old = tokenizer.post_processor
        tokenizer.post_processor = template if old is None else processors.Sequence([old, template])
    elif not add_bos and adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    else:
        return
    tokenizer.save(str(path))
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():  # transformers' Llama tokenizer rebuilds its template from this
        config = json.loads(config_path.read_text())
        config.update(add_bos_token=add_bos, add_eos_token=False)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    log(f"tokenizer: AutoTokenizer {'adds' if add_bos else 'adds no'} BOS, as in training")

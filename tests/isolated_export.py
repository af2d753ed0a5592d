"""A ``--to-hf`` export used where rat_plugin cannot be imported: run by the ``isolated_export``
fixture (conftest.py) as ``python -I -S isolated_export.py SPEC.json``, with the working
directory outside the repository and, on sys.path, a folder of links to the installed
packages without rat_plugin and torchtitan (and without the .pth files that would install an
editable rat_plugin).

It loads the export with ``trust_remote_code=True``, computes logits, greedy tokens, a hand-
written decoding loop, one Trainer step, the load-time checks on edited copies, a
save_pretrained round trip and lm_eval's ``hf`` model on the local tasks, and writes them to
SPEC's ``out`` folder for the tests to compare with rat_plugin's."""

import json
import shutil
import sys
import warnings
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
sys.path += spec["site"]

import importlib.util  # noqa: E402

for package in ("rat_plugin", "torchtitan"):
    assert importlib.util.find_spec(package) is None, f"{package} is importable"

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

torch.set_num_threads(1)
export, lively, out = Path(spec["export"]), Path(spec["lively"]), Path(spec["out"])
results: dict = {}


def load(folder=lively, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


model = load()
results["module"] = type(model).__module__
ids = torch.tensor(spec["ids"])
with torch.no_grad():
    tensors = {"logits": model(ids).logits}
    prompts = spec["prompts"]
    longest = max(map(len, prompts))
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    generated = model.generate(padded, attention_mask=mask, do_sample=False,
                               max_new_tokens=spec["new_tokens"], eos_token_id=None,
                               pad_token_id=0)
    results["generated"] = generated[:, longest:].tolist()
    # The decoding loop as written by hand, against full recomputation.
    step = model(ids, use_cache=True)
    tokens = ids
    worst = 0.0
    for _ in range(spec["new_tokens"]):
        new = step.logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, new], dim=1)
        step = model(new, past_key_values=step.past_key_values)
        full = model(tokens, use_cache=False).logits[:, -1]
        worst = max(worst, float((step.logits[:, -1] - full).abs().max()))
    results["loop_max_diff"] = worst
save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))

# One Trainer step.
from transformers import Trainer, TrainingArguments  # noqa: E402

train_model = load()
data = [{"input_ids": torch.tensor(row), "labels": torch.tensor(row)} for row in spec["train"]]
arguments = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2,
                              max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[],
                              save_strategy="no", use_cpu=True)
trainer = Trainer(model=train_model.train(), args=arguments, train_dataset=data)
trainer.train()
results["train_loss"] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
before, after = model.state_dict(), train_model.state_dict()
results["trained_changed"] = any(not torch.equal(before[k], after[k]) for k in before)
results["trained_finite"] = all(bool(v.isfinite().all()) for v in after.values())

# save_pretrained of the remote-code model copies the code: the copy loads the same.
train_model.save_pretrained(out / "copy")
copy = load(out / "copy")
results["copy_equal"] = all(torch.equal(copy.state_dict()[k], v) for k, v in after.items())


# The load-time checks of the generated code, on edited copies.
def edited(name, edit):
    folder = out / name
    shutil.copytree(lively, folder)
    edit(folder)
    return folder


def spoil(folder):
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"][3] = float("nan")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file(state, str(folder / "model.safetensors"), metadata=metadata)


def edit_config(**fields):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return edit


try:
    load(edited("nan", spoil))
    results["nan"] = None
except ValueError as err:
    results["nan"] = str(err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bf16 = load(edited("edited", edit_config(dtype="bf16", chunk_size=8)))
results["edit_warnings"] = [str(w.message) for w in caught if "edited after export" in
                            str(w.message)]
results["bf16_dtype"] = str(bf16.dtype)

# lm_eval's hf model on the local tasks, through its evaluator.
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

samples = {}
for name, (extra, tasks) in spec["lm_eval"].items():
    result = simple_evaluate(
        model="hf", model_args=f"pretrained={export},trust_remote_code=True,dtype=float32,"
        f"backend=causal{extra}", tasks=tasks, batch_size=4, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=spec["tasks"], include_defaults=False))
    samples[name] = result["samples"]
(out / "samples.json").write_text(json.dumps(samples, default=str))

results["foreign_modules"] = sorted(
    {m.split(".")[0] for m in sys.modules} & {"rat_plugin", "torchtitan"})
(out / "results.json").write_text(json.dumps(results))

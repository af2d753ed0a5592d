"""Run a GPU training config on CPU ranks at debug size: the GPU program, before GPU time.

    python tools/dry_run.py train_configs/rat_1p3b.toml [--nproc 2] [--fp32] [--dump-folder D]
        [-- more trainer options]

The config runs through torchtitan's own trainer (torchrun, gloo) with everything it sets:
optimizer, schedule, FSDP2, selective op activation checkpointing, per-block
``torch.compile(fullgraph=True)``, float8, checkpointing, bf16 parameters. Only these change:
- size: the debugmodel flavor, seq_len 256, 2 sequences per rank and micro-batch, a global batch
  of 8 (gradient accumulation), 4 steps (warm-up 1), a checkpoint every 2 steps, loss every step,
  validation (one batch per rank) at steps 1 and 4;
- data: the generated debug corpus, its validation split and tokenizer
  (``python -m rat_plugin.data.prepare``); for a fine-tuning config, the generated QA set
  (``rat_longqa``) from scratch (``--checkpoint.initial_load_path=`` clears the pretrained
  weights' path; give a seed after ``--`` to start from one);
- what a CPU cannot run: the compile backend is ``aot_eager`` (dynamo's fullgraph trace and the
  AOTAutograd joint graph, without inductor's codegen), and the plugin is loaded through
  ``rat_plugin.dry_run``, which resolves the kernels as on CUDA (the Triton scan custom op,
  with its CPU body; flex_attention with our BlockMasks, through its reference implementation).
``--fp32`` also trains in fp32 (``mixed_precision_param``), for exact comparisons.
tests/test_gpu_recipe.py runs every shipped GPU config this way (docs/design.md, "Dry run").
"""

import argparse
import subprocess
import sys

SIZE = (
    "--model.flavor=debugmodel",
    "--training.seq_len=256",
    "--training.local_batch_size=2",
    "--training.global_batch_size=8",
    "--training.steps=4",
    "--lr_scheduler.warmup_steps=1",
    "--checkpoint.interval=2",
    "--metrics.log_freq=1",
    "--validation.seq_len=256",
    "--validation.local_batch_size=2",
    "--validation.steps=1",
    "--validation.freq=4",
)
LOCAL_DATA = (
    "--model.hf_assets_path=./assets/tokenizer",
    "--training.dataset=rat_debug",
    "--training.dataset_path=./assets/data/rat_debug",
    "--validation.dataset=rat_debug_validation",
    "--validation.dataset_path=./assets/data/rat_debug",
)
# A fine-tuning config ([training] dataset "sft"): the generated QA set, from scratch unless
# the options name a seed (--checkpoint.initial_load_path after them wins).
LOCAL_SFT_DATA = (
    "--model.hf_assets_path=./assets/tokenizer",
    "--training.dataset=rat_longqa",
    "--training.dataset_path=./assets/data/rat_longqa",
    "--validation.dataset=rat_longqa_validation",
    "--validation.dataset_path=./assets/data/rat_longqa",
    "--sft.template=rat_longqa",
    "--sft.answer_field=answers",
    "--checkpoint.initial_load_path=",
)
ON_CPU = ("--experimental.custom_import=rat_plugin.dry_run", "--compile.backend=aot_eager")
FP32 = ("--training.mixed_precision_param=float32",)


def fine_tunes(config: str) -> bool:
    """Whether ``config`` trains on instruction data (``[training] dataset = "sft"``)."""
    import tomllib

    with open(config, "rb") as f:
        return tomllib.load(f).get("training", {}).get("dataset") == "sft"


def debug_size(fp32: bool = False, sft: bool = False) -> tuple[str, ...]:
    """The trainer options for the debug size and data (and fp32 training)."""
    return SIZE + (LOCAL_SFT_DATA if sft else LOCAL_DATA) + (FP32 if fp32 else ())


def dry_run_options(fp32: bool = False, sft: bool = False) -> tuple[str, ...]:
    """The trainer options that turn a shipped GPU config into its CPU dry run."""
    return debug_size(fp32, sft) + ON_CPU


def command(config: str, nproc: int, options: tuple[str, ...]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--standalone", "-m", "torchtitan.train", "--job.config_file", config, *options,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a training TOML, e.g. train_configs/rat_1p3b.toml")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks (FSDP over them)")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16")
    parser.add_argument("--dump-folder", default="./outputs/dry_run")
    args, trainer_options = parser.parse_known_args(argv)  # after --: the trainer's options
    if trainer_options[:1] == ["--"]:
        trainer_options = trainer_options[1:]
    options = (*dry_run_options(args.fp32, fine_tunes(args.config)),
               f"--job.dump_folder={args.dump_folder}",
               *trainer_options)
    cmd = command(args.config, args.nproc, options)
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

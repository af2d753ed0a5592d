"""Score a model folder by generation on the offline lm_eval tasks (fine-tunes nothing).

    python tools/score_generation.py --model rat_model --tasks rat_longqa --out eval/longqa
    python tools/score_generation.py --model rat_hf --out eval/longbench \\
        --tasks longbench_narrativeqa,longbench_qmsum --longbench-dir data/LongBench/data
    python tools/score_generation.py --model rat_model --tasks ruler_niah --out eval/ruler \\
        --haystack assets/data/rat_debug/validation.jsonl --ruler-lengths 4096 8192
        [--max-length N] [--max-gen-toks N] [--limit N] [--batch-size N] [--template NAME]
        [--device cuda --dtype bf16] [--no-bos] [--force]

--model is a folder from tools/convert_checkpoint.py (lm_eval model ``rat``) or its --to-hf
export (lm_eval's ``hf`` with the middle cut, ``hf_middle``). --tasks names tasks or tags of
rat_plugin/eval/tasks: the LongBench tasks (``longbench_*``, read from --longbench-dir),
``rat_longqa`` (the generated QA set, --rat-longqa-dir) and RULER's needle tasks (``niah_*``,
tag ``ruler_niah``; essay haystacks from --haystack). Every prompt longer than max_length (the
training length unless --max-length) less the task's answer room (max_gen_toks) is cut in the
middle. Writes scores.json (every metric of every task, the settings), scores.md (a table) and
samples.jsonl (each generation, its answers and scores) to --out.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _eval_common as common  # noqa: E402

from rat_plugin.convert import output_folder  # noqa: E402
from rat_plugin.eval.local_tasks import TASKS_DIR  # noqa: E402

RESULT = "scores.json"
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


positive.__name__ = "whole number >= 1"  # argparse names the type in its error


def parse_args(argv=None):
    parser = common.parser(__doc__, "eval/generation")
    parser.add_argument("--tasks", required=True, help="comma-separated task names or tags")
    parser.add_argument("--longbench-dir", help="folder of LongBench's {task}.jsonl files")
    parser.add_argument("--rat-longqa-dir", help="folder of the generated QA set's splits "
                                                 "(default assets/data/rat_longqa)")
    parser.add_argument("--rat-longqa-split", default="test")
    parser.add_argument("--template", help="rat_longqa's prompt template: a name in "
                                           "rat_plugin.data.templates or a template string")
    parser.add_argument("--haystack", help="text (.txt, or .jsonl of {'text': ...}) of RULER's "
                                           "essay haystacks")
    parser.add_argument("--ruler-lengths", type=positive, nargs="+",
                        help="RULER prompt lengths (default: max_length)")
    parser.add_argument("--ruler-samples", type=positive, default=500)
    parser.add_argument("--max-length", type=positive, help="default: the training length")
    parser.add_argument("--max-gen-toks", type=positive,
                        help="every task's answer room (default: each task's own)")
    parser.add_argument("--limit", type=positive, help="score the first N records of each task")
    parser.add_argument("--batch-size", type=positive, default=1)
    return parser.parse_args(argv)


def route(args) -> tuple[str, str, int]:
    """(lm_eval model, its model_args, max_length) for the folder --model."""
    from rat_plugin.generate.loading import ModelFolderError
    from rat_plugin.hf.export import is_hf_folder

    folder = Path(args.model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelFolderError(f"{folder}/config.json is missing or not JSON: give a folder "
                               "from tools/convert_checkpoint.py or its --to-hf export") from None
    hf = is_hf_folder(folder)
    max_length = args.max_length or (config["max_seq_len"] if hf else config["args"]["max_seq_len"])
    model_args = {"pretrained": str(folder), "max_length": max_length}
    if hf:
        model_args |= {"dtype": HF_DTYPES.get(args.dtype, "auto"), "backend": "causal"}
        if args.no_bos:
            model_args["add_bos_token"] = False
    else:
        model_args |= {"add_bos": not args.no_bos} | ({"dtype": args.dtype} if args.dtype else {})
    return ("hf_middle" if hf else "rat"), \
        ",".join(f"{k}={v}" for k, v in model_args.items()), max_length


def metadata(args, max_length: int) -> dict:
    """The tasks' settings (rat_plugin/eval/local_tasks.py reads them)."""
    settings = {
        "longbench_dir": args.longbench_dir, "rat_longqa_dir": args.rat_longqa_dir,
        "rat_longqa_split": args.rat_longqa_split, "rat_longqa_template": args.template,
        "haystack": args.haystack, "max_seq_lengths": args.ruler_lengths,
        "num_samples": args.ruler_samples, "tokens_to_generate": args.max_gen_toks,
        "pretrained": args.model, "max_length": max_length,
        "add_bos": False if args.no_bos else None,
    }
    return {k: v for k, v in settings.items() if v is not None}


def task_names(manager, names: list[str]) -> list[str]:
    known = set(manager.all_tasks) | set(manager.all_tags)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown task {', '.join(unknown) or '(none)'}: the offline tasks are "
                         f"{', '.join(sorted(manager.all_subtasks))} and the tags "
                         f"{', '.join(sorted(manager.all_tags))}")
    return names


def summarize(results: dict, samples: dict) -> dict:
    """task -> {"samples": n, "metrics": {name: value}} (lm_eval's ",none" filter dropped)."""
    tasks = {}
    for task, values in sorted(results.items()):
        if task not in samples:
            continue  # a tag's or group's own line
        metrics = {key.split(",")[0]: value for key, value in values.items()
                   if "," in key and "_stderr" not in key and value != -1}
        tasks[task] = {"samples": len(samples[task]), "metrics": metrics}
    return tasks


def table(tasks: dict) -> str:
    """A Markdown table: each metric of each task, x100 (LongBench's scale)."""
    lines = ["| task | samples | score | metrics |", "|---|---:|---:|---|"]
    for task, entry in tasks.items():
        metrics = entry["metrics"]
        others = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k != "score")
        lines.append(f"| {task} | {entry['samples']} | {100 * metrics['score']:.2f} | {others} |")
    return "\n".join(lines) + "\n"


def sample_lines(samples: dict) -> list[str]:
    lines = []
    for task, rows in sorted(samples.items()):
        for row in sorted(rows, key=lambda r: r["doc_id"]):
            doc = row["doc"]
            lines.append(json.dumps({
                "task": task, "doc_id": row["doc_id"], "generation": row["filtered_resps"][0],
                "answers": doc.get("answers", doc.get("outputs")),
                "scores": {m: row[m] for m in row["metrics"] if row[m] != -1},
            }, ensure_ascii=False))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)

    def run():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local files only
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import rat_plugin.eval.harness  # noqa: F401  (registers rat and hf_middle)
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        model, model_args, max_length = route(args)
        common.check_out(args, RESULT, {k: v for k, v in {
            "--longbench-dir": args.longbench_dir, "--rat-longqa-dir": args.rat_longqa_dir,
            "--haystack": args.haystack}.items() if v})
        settings = metadata(args, max_length)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                              metadata=settings)
        names = task_names(manager, [n for n in args.tasks.split(",") if n])
        result = simple_evaluate(
            model=model, model_args=model_args, tasks=names, task_manager=manager,
            batch_size=args.batch_size, device=str(common.resolve_device(args.device)),
            limit=args.limit, log_samples=True,
            gen_kwargs=f"max_gen_toks={args.max_gen_toks}" if args.max_gen_toks else None)
        tasks = summarize(result["results"], result["samples"])
        payload = {"model": str(args.model), "lm_eval_model": model, "model_args": model_args,
                   "settings": settings, "tasks": tasks}
        with output_folder(Path(args.out), args.force, log=print) as tmp:
            (tmp / RESULT).write_text(json.dumps(payload, indent=2) + "\n")
            (tmp / "scores.md").write_text(table(tasks))
            (tmp / "samples.jsonl").write_text("".join(
                line + "\n" for line in sample_lines(result["samples"])))
        print(table(tasks), end="")
        print(f"wrote {RESULT}, scores.md and samples.jsonl in {args.out}")

    return common.run(run)


if __name__ == "__main__":
    sys.exit(main())

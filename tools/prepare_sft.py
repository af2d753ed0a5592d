"""Write the RAT paper's fine-tuning datasets, downloaded to local disk, as instruction records.

    hf download deepmind/narrativeqa --repo-type dataset --local-dir data/hf/narrativeqa
    python tools/prepare_sft.py narrativeqa_summary data/hf/narrativeqa data/sft/narrativeqa
    hf download pszemraj/qmsum-cleaned --repo-type dataset --local-dir data/hf/qmsum-cleaned
    python tools/prepare_sft.py qmsum data/hf/qmsum-cleaned/no-prefix data/sft/qmsum
    hf download d0rj/wikisum --repo-type dataset --local-dir data/hf/wikisum
    python tools/prepare_sft.py wikisum data/hf/wikisum data/sft/wikisum

OUT gets {train,validation,test}.jsonl in LongBench's fields ({"context", "input", "answers",
"_id"}), selected and shuffled as the paper does (rat_plugin/data/sft_sources.py), written
atomically; ``[training] dataset = "sft"`` with ``dataset_path = OUT`` reads them (docs/sft.md).
SRC is a download folder (parquet shards), a save_to_disk folder, or one file per split.
"""

import argparse
import sys
from pathlib import Path

from rat_plugin.atomic import atomic_dir
from rat_plugin.data.sft import load_split
from rat_plugin.data.sft_sources import TASKS, TEMPLATE_OF, convert_split
from rat_plugin.generate.arguments import OneLineParser
from rat_plugin.infra import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(TASKS), help="the paper's task name")
    parser.add_argument("src", help="the downloaded dataset (folder or file)")
    parser.add_argument("out", help="output folder (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        sources = {split: load_split(args.src, split) for split in TASKS[args.task][1]}
        with atomic_dir(args.out, args.force) as tmp:
            for split, rows in sources.items():
                records = convert_split(args.task, split, rows)
                records.to_json(str(Path(tmp) / f"{split}.jsonl"), lines=True,
                                force_ascii=False)
                print(f"{split}: {len(records)} records from {len(rows)} rows")
    except (ConfigError, FileExistsError, KeyError, OSError) as err:
        message = f"a {args.src} row has no field {err}" if isinstance(err, KeyError) else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    template = TEMPLATE_OF.get(args.task, "narrativeqa")
    print(f"wrote {args.out}: train with --training.dataset=sft --training.dataset_path="
          f"{args.out} --sft.template={template} (validation: sft_validation, the same path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

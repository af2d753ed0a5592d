"""Stage 3, the paper's token-mixing block benchmark, through tools/bench_block.py.

Each planned item is a bench_block command line; this stage parses it with bench_block's own
parser and runs its cases with bench_block's functions (one process, so compiled kernels are
shared), recording each case as it is measured. The tables are bench_block's: the sweep (RAT
L=16 against attention and SWA, training fwd+bwd and decoding) and RAT L=16 with the unmeasured
kernel settings against the defaults.
"""

import bench_block
import _bench_common as bench

from gpu_check_stages._stage import Recorder, main


def measure(item: dict):
    opts = bench_block.parse_args(item["command"][2:])  # after python3 tools/bench_block.py
    device = bench.parse_device(opts.device)
    dtype = bench.parse_dtype(opts.dtype)
    setup = bench_block.describe_setup(opts, device, dtype)
    for record in bench_block.run_cases(opts, device, dtype):
        record.pop("times_ms", None)
        yield dict(record, setup=setup, attention_backend=bench_block.attention_backend(device)[0])


def sweep_table(items: list[dict]) -> dict:
    records = [r for i in items if i["params"].get("group") == "sweep" for r in i["records"]]
    names = list(dict.fromkeys(r["mixer"] for r in records))
    headers, rows = bench_block.summarize(records, names) if records else ([], [])
    setups = sorted({r["setup"] for r in records} | {r["attention_backend"] for r in records})
    return dict(title="Token-mixing block, RAT against attention (ratio = attention ms / RAT ms)",
                setup="; ".join(setups), markdown=bench.markdown_table(headers, rows)
                if rows else "(no case measured)")


def kernels_table(items: list[dict]) -> dict:
    rows, default = [], None
    for item in items:
        if item["params"].get("group") != "kernels":
            continue
        for record in item["records"]:
            setting = item["params"]["setting"]
            default = record["ms"] if setting == "defaults" else default
            rows.append([setting, record["mode"], str(record["seq_len"]), str(record["batch"]),
                         bench.fmt_ms(record["ms"]), bench.fmt_ratio(default, record["ms"])
                         if setting != "defaults" else "-"])
    headers = ["setting", "mode", "T", "batch", "rat_L16 ms", "defaults/this"]
    return dict(title="RAT L=16 with the unmeasured kernel settings against the defaults "
                      "(defaults/this > 1: the setting is faster)",
                markdown=bench.markdown_table(headers, rows) if rows else "(no case measured)")


def run(spec: dict, recorder: Recorder) -> str | None:
    recorder.tables = lambda items: [sweep_table(items), kernels_table(items)]
    recorder.run_items(spec["items"], measure)
    return None


if __name__ == "__main__":
    main(run)

"""Stage 4, whole-model generation (random weights), through tools/bench_generate.py.

Each planned item is one model, eager or with the CUDA-graph decode step, as a bench_generate
command line, parsed by its own parser and measured by its ``measure``; the tables are
bench_generate's (each model against its attention baseline), one pair per decode mode.
"""

import bench_generate
import _bench_common as bench

from gpu_check_stages._stage import Recorder, main


def measure(item: dict):
    opts = bench_generate.parse_args(item["command"][2:])  # after python3 tools/...py
    device = bench.parse_device(opts.device)
    dtype = bench.parse_dtype(opts.dtype)
    setup = bench_generate.describe_setup(opts, device, dtype)
    for kind in opts.kinds:
        run, latency = bench_generate.measure(kind, opts, device, dtype)
        yield dict(throughput=run, latency=latency, setup=setup)


def tables(items: list[dict]) -> list[dict]:
    out = []
    for graph in (False, True):
        records = [r for i in items if i["params"]["cuda_graph"] == graph for r in i["records"]]
        if not records:
            continue
        throughput = [r["throughput"] for r in records]
        latency = [step for r in records for step in r["latency"]]
        (t_headers, t_rows), (l_headers, l_rows) = bench_generate.tables(throughput, latency)
        mode = "CUDA-graph decode step" if graph else "eager decode step"
        setup = records[0]["setup"]
        out.append(dict(title=f"Generation throughput, {mode}", setup=setup,
                        markdown=bench.markdown_table(t_headers, t_rows)))
        out.append(dict(title=f"Decode-step latency, {mode}", setup=setup,
                        markdown=bench.markdown_table(l_headers, l_rows)))
    return out


def run(spec: dict, recorder: Recorder) -> str | None:
    recorder.tables = tables
    recorder.run_items(spec["items"], measure)
    return None


if __name__ == "__main__":
    main(run)

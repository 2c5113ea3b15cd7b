"""`python -m bench` (`make bench`): run every benchmark beside its baseline, print one table,
write bench/results/<name>.json and docs/performance.md.

`python -m bench --quick` for short runs; `--only decode,int8` for a subset; `--report` only
re-renders docs/performance.md from the result files already written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from bench.common import RESULTS, table, write_result

BENCHES: dict[str, str] = {
    "train_throughput": "bench.train_throughput",
    "decode": "bench.decode",
    "chat_ttft": "bench.chat_ttft",
    "server_throughput": "bench.server_throughput",
    "int8": "bench.int8",
    "server_load": "bench.server_load",
    "datagen_cache": "bench.datagen_cache",
    "world_throughput": "bench.world_throughput",
}
DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def render_doc(results: list[dict]) -> str:
    machines = {json.dumps(r.get("machine", {}).get("cpu")) for r in results}
    return (
        "# Performance\n\nThe latest table written by `make bench` (`python -m bench`). Every ratio compares llavakit "
        "with its baseline measured in the same run on the same machine; absolute numbers depend on the "
        "machine and on its load (see `cpu_pressure_after` and `machine` in `bench/results/*.json`).\n\n"
        + table(results) + "\n\nMachines: " + ", ".join(sorted(machines)) + "\n"
        + "".join("\n" + r["doc"].strip() + "\n" for r in results if r.get("doc"))  # a bench's own section
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    p.add_argument("--report", action="store_true", help="only re-render docs/performance.md from bench/results")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown bench {unknown}; known: {', '.join(BENCHES)}")
    if not args.report:
        for name in names:
            print(f"== {name}", flush=True)
            write_result(importlib.import_module(BENCHES[name]).run(quick=args.quick))
    results = [json.loads((RESULTS / f"{n}.json").read_text()) for n in BENCHES if (RESULTS / f"{n}.json").is_file()]
    print(table(results))
    DOC.write_text(render_doc(results))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared bench helpers: machine info, memory read bandwidth, result files and tables.

Every bench module exposes `run(quick: bool) -> dict` returning
`{"name": str, "rows": [{"measure": str, "value": float, "unit": str, "baseline": float | None,
"ratio": float | None, "goal": str}], ...extra}`; `python -m bench` runs them all, prints one
table, writes bench/results/<name>.json and docs/performance.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem_gb,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_bandwidth_gbs(size_mb: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Best-of-N memory read bandwidth (GB/s): summing a buffer much larger than the caches.

    threads: torch threads for the sum (default: the current setting), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)  # [N]
        buf.sum()  # touch every page once
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / best / 1e9


def best_read_bandwidth_gbs() -> tuple[float, dict[int, float]]:
    """The machine's read bandwidth: the best over one thread and all threads (GB/s), and each measure.

    On a loaded machine one thread can beat all of them; the floor uses whichever is higher."""
    import torch

    measures = {t: read_bandwidth_gbs(threads=t) for t in sorted({1, torch.get_num_threads()})}
    return max(measures.values()), measures


def row(measure: str, value: float, unit: str, baseline: float | None = None, goal: str = "",
        higher_is_better: bool = True) -> dict:
    """One table row; ratio is value/baseline (or baseline/value when lower is better)."""
    ratio = None
    if baseline:
        ratio = value / baseline if higher_is_better else baseline / value
    return {"measure": measure, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "goal": goal}


def write_result(result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result['name']}.json"
    payload = {**result, "machine": machine_info()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(results: list[dict]) -> str:
    """A Markdown table of every row of every result."""
    lines = ["| bench | measure | value | unit | baseline | ratio | goal |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['name']} | {r['measure']} | {_fmt(r['value'])} | {r['unit']} | {_fmt(r['baseline'])} | "
                + (f"{r['ratio']:.2f}x" if r.get("ratio") else "-") + f" | {r.get('goal', '')} |"
            )
    return "\n".join(lines)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a bench's child server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

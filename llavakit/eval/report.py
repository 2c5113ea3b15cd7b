"""Reports of a scored run: results.json, a Markdown table (results.md) and a bar chart (chart.png)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_CHART_GROUPS = 3


def fmt(value: Any) -> str:
    """Numbers for tables: integers as is, other numbers with two decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def markdown(results: Mapping[str, Any]) -> str:
    """A readable summary: headline metrics (after any `details.notes`), then one table per breakdown."""
    title = results["benchmark"] + (f" — {results['model_id']}" if results.get("model_id") else "")
    lines = [f"# {title}", "", f"{results['num_questions']} questions; rates in percent; charted: `{results['primary']}`.", ""]
    lines += [f"Note: {note}" for note in results.get("details", {}).get("notes", [])]
    lines += [""] if results.get("details", {}).get("notes") else []
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in results["metrics"].items()]
    for group, rows in results.get("breakdown", {}).items():
        columns = list(dict.fromkeys(k for row in rows.values() for k in row))
        lines += ["", f"## {group}", "", "| " + " | ".join([group, *columns]) + " |"]
        lines.append("| " + " | ".join(["---"] * (len(columns) + 1)) + " |")
        lines += ["| " + " | ".join([name, *(fmt(row.get(c, "")) for c in columns)]) + " |" for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def _chart_metric(rows: Mapping[str, Mapping[str, Any]], primary: str) -> str | None:
    """The metric to chart for a breakdown: the primary one if rows have it, else F1, else their first non-count number."""
    first = next(iter(rows.values()), {})
    for preferred in (primary, "f1"):
        if preferred in first:
            return preferred
    return next((k for k, v in first.items() if k != "count" and isinstance(v, float)), None)


def write_chart(results: Mapping[str, Any], path: Path) -> None:
    """Horizontal bar charts: headline metrics, then up to three breakdowns of two or more rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("overall", dict(results["metrics"]))]
    groups = [(g, rows) for g, rows in results.get("breakdown", {}).items() if len(rows) > 1]
    for group, rows in groups[:MAX_CHART_GROUPS]:
        metric = _chart_metric(rows, results["primary"])
        if metric:
            panels.append((f"{group}: {metric}", {name: row[metric] for name, row in rows.items() if metric in row}))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.2 + sum(0.35 * len(v) + 0.6 for _, v in panels)), squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], panels):
        names, nums = list(values)[::-1], list(values.values())[::-1]
        bars = ax.barh(names, nums, color="#4C72B0")
        ax.bar_label(bars, labels=[fmt(float(v)) for v in nums], padding=3, fontsize=8)
        ax.set_title(title, fontsize=10, loc="left")
        ax.margins(x=0.15)
        ax.tick_params(labelsize=8)
    fig.suptitle(results["benchmark"] + (f" — {results['model_id']}" if results.get("model_id") else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(results: Mapping[str, Any], out_dir: Path) -> None:
    """results.json, results.md and chart.png in `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(results), encoding="utf-8")
    write_chart(results, out_dir / "chart.png")

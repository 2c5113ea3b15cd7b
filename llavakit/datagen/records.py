"""LLaVA records, atomic output files and the run report shared by all datagen commands."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavakit.datagen.parse import IMAGE_TOKEN

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


def place_image(question: str, rng: random.Random) -> str:
    """Put `<image>` before or after the question text (LLaVA style), chosen by `rng`."""
    return f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_TOKEN}"


def record_rng(seed: int, record_id: str) -> random.Random:
    """A per-record RNG: record-level choices do not depend on generation order."""
    return random.Random(f"{seed}/{record_id}")


def make_record(record_id: str, image: str, pairs: list[tuple[str, str]], rng: random.Random,
                provenance: dict[str, Any]) -> dict:
    """A LLaVA record with `<image>` once, in the first human turn."""
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": place_image(q, rng) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": record_id, "image": image, "conversations": conv, "provenance": provenance}


def write_atomic(path: Path, write) -> None:
    """Write via a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp.*"):  # left by a run killed while writing
        pid = stale.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    def dump(f):
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")

    write_atomic(path, dump)


def write_json_lines(path: Path, rows: list[dict]) -> None:
    def dump(f):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(path, dump)


def write_records(path: Path, records: list[dict]) -> None:
    """A LLaVA JSON list, one record per line (valid JSON, diff- and grep-friendly)."""

    def dump(f):
        f.write("[\n")
        for i, rec in enumerate(records):
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write(",\n" if i < len(records) - 1 else "\n")
        f.write("]\n")

    write_atomic(path, dump)


def sidecar(out: Path, suffix: str) -> Path:
    """data.json -> data.report.json / data.rejections.jsonl."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + suffix)


@dataclass
class KindStats:
    """Per-kind counts. items = records + rejected; records = generated + cached."""

    items: int = 0
    records: int = 0
    generated: int = 0
    """Accepted outputs produced by the teacher in this run."""
    cached: int = 0
    """Accepted outputs read from the cache."""
    rejected: int = 0
    """Items without a record, each with a reason (this run's and cached rejections)."""
    rejected_cached: int = 0
    """Of `rejected`: rejections read from the cache (not asked again without --retry-rejected)."""
    retried: int = 0
    """Extra teacher requests: transport retries (429/5xx/timeouts) and re-asks after a rejection."""
    calls: int = 0
    """Teacher calls made in this run (not counting transport retries)."""
    reasons: Counter = field(default_factory=Counter)
    """Why items were rejected (code -> count); the rejections file has one line per item."""
    retry_reasons: Counter = field(default_factory=Counter)
    """Why requests were retried (code -> count)."""

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("items", "records", "generated", "cached", "rejected",
                                              "rejected_cached", "retried", "calls")}
        out["reasons"] = dict(sorted(self.reasons.items()))
        out["retry_reasons"] = dict(sorted(self.retry_reasons.items()))
        return out


@dataclass
class Report:
    command: str
    out: str
    kinds: dict[str, KindStats] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    elapsed_s: float = 0.0

    def kind(self, name: str) -> KindStats:
        return self.kinds.setdefault(name, KindStats())

    @property
    def totals(self) -> KindStats:
        t = KindStats()
        for s in self.kinds.values():
            for k in ("items", "records", "generated", "cached", "rejected", "rejected_cached", "retried", "calls"):
                setattr(t, k, getattr(t, k) + getattr(s, k))
            t.reasons.update(s.reasons)
            t.retry_reasons.update(s.retry_reasons)
        return t

    def to_json(self) -> dict:
        return {
            "command": self.command,
            "out": self.out,
            "elapsed_s": round(self.elapsed_s, 3),
            "kinds": {k: s.to_json() for k, s in self.kinds.items()},
            "total": self.totals.to_json(),
            **self.info,
        }

    def format(self) -> str:
        cols = ("items", "records", "generated", "cached", "rejected", "retried", "calls")
        rows = [("kind", *cols)]
        for name, s in [*self.kinds.items(), ("total", self.totals)]:
            rows.append((name, *(str(getattr(s, c)) for c in cols)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"datagen {self.command}: {self.out} ({self.elapsed_s:.1f}s)"]
        for r in rows:
            cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            lines.append("  " + "  ".join(cells))
        reasons = self.totals.reasons
        if reasons:
            lines.append("  rejections: " + ", ".join(f"{k} x{v}" for k, v in reasons.most_common()))
        for key in ("records_per_s", "cache", "skipped_missing_images", "rejections_file", "report_file"):
            if key in self.info and self.info[key] not in (None, 0, [], {}):
                value = self.info[key]
                if key == "skipped_missing_images":
                    value = len(value)
                lines.append(f"  {key}: {value}")
        return "\n".join(lines)

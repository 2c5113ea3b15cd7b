"""`llavakit datagen mix`: combine LLaVA JSON sources with ratios and a seed.

A ratio multiplies the size of its source: 1.0 takes every record once, 0.25 a random quarter
(without replacement), 2.5 every record twice plus a random half. Repeated copies get ids
`<id>#2`, `<id>#3`, ...; an id already used by an earlier source gets `#<source stem>` appended
(counted in the report as `renamed`). Each record's provenance gains `mix_source`. The result is
shuffled with the seed (unless shuffle is off) and written atomically.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from llavakit.datagen.config import DatagenError, MixConfig
from llavakit.datagen.records import Report, sidecar, write_json_atomic, write_records


def read_records(path: Path) -> list[dict]:
    """A LLaVA JSON list (or JSONL); every record must have an id and a non-empty conversations list."""
    from llavakit.data.records import load_records

    try:  # the training loader's reader: UTF-8 and JSON errors name the file and the line
        data = load_records(path)
    except ValueError as exc:
        raise DatagenError(str(exc)) from None
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("conversations"), list) \
                or not rec["conversations"]:
            raise DatagenError(f"{path}: record {i} is not a LLaVA record (needs 'id' and 'conversations')")
    return data


def mix_sources(config: MixConfig) -> Report:
    t0 = time.perf_counter()
    report = Report("mix", str(config.out))
    used: set[str] = set()
    mixed: list[dict] = []
    renamed = 0
    for n, src in enumerate(config.sources):
        records = read_records(src.path)
        rng = random.Random(f"{config.seed}/{n}/{src.path.name}")
        whole = math.floor(src.ratio)
        extra = math.floor((src.ratio - whole) * len(records) + 0.5)  # half up (round() halves to even: 0.5 of 1 -> 0)
        picked: list[tuple[dict, int]] = [(r, copy) for copy in range(whole) for r in records]
        picked += [(r, whole) for r in rng.sample(records, min(extra, len(records)))]
        name = src.path.name
        if name in report.kinds:
            name = f"{name}#{n}"
        st = report.kind(name)
        st.items = len(records)
        for rec, copy in picked:
            rid = str(rec["id"]) if copy == 0 else f"{rec['id']}#{copy + 1}"
            if rid in used:
                base, k = f"{rid}#{src.path.stem}", 1
                rid = base
                while rid in used:
                    k += 1
                    rid = f"{base}{k}"
                renamed += 1
            used.add(rid)
            prov = dict(rec.get("provenance") or {})
            prov["mix_source"] = str(src.path)
            mixed.append({**rec, "id": rid, "provenance": prov})
            st.records += 1
            st.generated += 1
    if config.shuffle:
        random.Random(config.seed).shuffle(mixed)
    write_records(config.out, mixed)
    report.elapsed_s = time.perf_counter() - t0
    report_path = sidecar(config.out, ".report.json")
    report.info.update({"seed": config.seed, "renamed": renamed,
                        "sources": [{"path": str(s.path), "ratio": s.ratio} for s in config.sources],
                        "report_file": str(report_path)})
    write_json_atomic(report_path, report.to_json(), indent=2)
    return report

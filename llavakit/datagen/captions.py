"""`llavakit datagen captions`: stage-1 caption data (LCS-558K style).

Each record is an image, one brief-description instruction drawn from a list
(`prompts/brief_questions.json`, overridable) and one caption as the answer. With `per_image='one'`
a caption is drawn per image with the seed; with `'all'` every caption becomes its own record.
Images without captions are counted in the report (never dropped silently).
"""

from __future__ import annotations

import time

from llavakit import __version__
from llavakit.datagen.config import CaptionsConfig
from llavakit.datagen.packs import load_list
from llavakit.datagen.records import Report, make_record, record_rng, sidecar, write_json_atomic, write_records


def generate_captions(config: CaptionsConfig) -> Report:
    t0 = time.perf_counter()
    dataset = config.source.load()
    brief = load_list("brief_questions", config.prompt_dir)
    report = Report("captions", str(config.out))
    st = report.kind("captions")
    records = []
    for img in dataset.images:
        st.items += 1
        if not img.captions:
            st.rejected += 1
            st.reasons["no_captions"] += 1
            continue
        if config.per_image == "one":
            chosen = [record_rng(config.seed, f"{img.image_id}-caption-pick").randrange(len(img.captions))]
        else:
            chosen = list(range(len(img.captions)))
        for idx in chosen:
            rid = f"{img.image_id}-caption" if config.per_image == "one" else f"{img.image_id}-caption{idx}"
            rng = record_rng(config.seed, rid)
            provenance = {"source": "datagen-captions", "image_id": img.image_id, "caption_index": idx,
                          "instructions": f"{brief.name} v{brief.version}", "llavakit": __version__}
            records.append(make_record(rid, img.file_name, [(rng.choice(brief.prompts), img.captions[idx])], rng,
                                       provenance))
            st.records += 1
            st.generated += 1
    write_records(config.out, records)
    report.elapsed_s = time.perf_counter() - t0
    report_path = sidecar(config.out, ".report.json")
    report.info.update({"images": len(dataset.images), "sources": dataset.sources, "seed": config.seed,
                        "per_image": config.per_image, "skipped_missing_images": dataset.skipped_missing_images,
                        "report_file": str(report_path)})
    write_json_atomic(report_path, report.to_json(), indent=2)
    return report

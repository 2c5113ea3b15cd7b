"""`llavakit datagen vqa`: LLaVA-1.5 style short-answer and multiple-choice items from the scenes.

- short answer: one multi-turn record per image, each question followed by
  "Answer the question using a single word or phrase." and answered with one word or phrase
  (counts as digits, positions as grid cells, yes/no, colours, categories, ...);
- multiple choice: one record per item, options lettered A., B., ... (the right one at a random
  letter) followed by "Answer with the option's letter from the given choices directly.",
  answered with the letter.

Questions come from the same `SceneQA` engine as the offline teacher (so they are definite and
correct, with varied phrasing).
"""

from __future__ import annotations

import random
import time

from llavakit import __version__
from llavakit.datagen.config import VQAConfig
from llavakit.datagen.records import (
    MC_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    Report,
    make_record,
    record_rng,
    sidecar,
    write_json_atomic,
    write_records,
)
from llavakit.datagen.sceneqa import GENERATOR_VERSION, QA, SceneQA

LETTERS = "ABCDEFGH"
MAX_OPTIONS = 4
# Question types whose answers come from a closed set of at least three options.
MC_TYPES = ("count", "total", "color", "shape", "position", "size", "background", "direction", "chart")


def multiple_choice(qa: QA, rng: random.Random) -> tuple[str, str, list[str]] | None:
    """(question with lettered options and the suffix, answer letter, options) or None."""
    domain = list(dict.fromkeys(qa.choices))
    if qa.short not in domain or len(domain) < 3:
        return None
    distractors = rng.sample([c for c in domain if c != qa.short], min(MAX_OPTIONS - 1, len(domain) - 1))
    options = [qa.short, *distractors]
    rng.shuffle(options)
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    question = "\n".join([qa.question, *lines, MC_SUFFIX])
    return question, LETTERS[options.index(qa.short)], options


def generate_vqa(config: VQAConfig) -> Report:
    t0 = time.perf_counter()
    dataset = config.source.load()
    engine = SceneQA(dataset)
    report = Report("vqa", str(config.out))
    short_st, mc_st = report.kind("short_answer"), report.kind("multiple_choice")
    records = []
    base = {"source": "datagen-vqa", "generator": f"sceneqa-v{GENERATOR_VERSION}", "llavakit": __version__}
    for img in dataset.images:
        if config.questions_per_image:
            short_st.items += 1
            rng = random.Random(f"{config.seed}/{img.image_id}/vqa")
            qas = engine.sample(img, rng, config.questions_per_image, config.types)
            if qas:
                rid = f"{img.image_id}-vqa"
                pairs = [(f"{q.question}\n{SHORT_ANSWER_SUFFIX}", q.short) for q in qas]
                prov = {**base, "image_id": img.image_id, "format": "short_answer", "qtypes": [q.qtype for q in qas]}
                records.append(make_record(rid, img.file_name, pairs, record_rng(config.seed, rid), prov))
                short_st.records += 1
                short_st.generated += 1
            else:
                short_st.rejected += 1
                short_st.reasons["no_questions"] += 1
        if config.mc_per_image:
            rng = random.Random(f"{config.seed}/{img.image_id}/mc")
            made = 0
            mc_types = tuple(t for t in MC_TYPES if config.types is None or t in config.types)
            for qa in engine.sample(img, rng, 4 * config.mc_per_image, mc_types):
                if made == config.mc_per_image:
                    break
                mc = multiple_choice(qa, rng)
                if mc is None:
                    continue
                question, letter, options = mc
                rid = f"{img.image_id}-mc{made}"
                prov = {**base, "image_id": img.image_id, "format": "multiple_choice", "qtype": qa.qtype,
                        "options": options, "answer": qa.short}
                rng_rec = record_rng(config.seed, rid)
                records.append(make_record(rid, img.file_name, [(question, letter)], rng_rec, prov))
                made += 1
            mc_st.items += config.mc_per_image
            mc_st.records += made
            mc_st.generated += made
            if made < config.mc_per_image:
                mc_st.rejected += config.mc_per_image - made
                mc_st.reasons["no_multiple_choice_question"] += config.mc_per_image - made
    write_records(config.out, records)
    report.elapsed_s = time.perf_counter() - t0
    report_path = sidecar(config.out, ".report.json")
    report.info.update({"images": len(dataset.images), "sources": dataset.sources, "seed": config.seed,
                        "generator": f"sceneqa-v{GENERATOR_VERSION}",
                        "skipped_missing_images": dataset.skipped_missing_images, "report_file": str(report_path)})
    write_json_atomic(report_path, report.to_json(), indent=2)
    return report

"""Phrasing: reword part of the training questions, and reword the benchmark with phrasings nobody trained on.

`vary_records` rewrites a fraction of the short-answer and multiple-choice turns of LLaVA records
(the answer-format line and the way the question is introduced), so that the model does not key
on one exact wording. `paraphrase_benchmark` writes a copy of an offline benchmark file whose
short-answer questions are asked with templates used neither by the data generator
(llavakit.datagen.sceneqa), nor by `vary_records`, nor by the benchmark itself: the answers are
unchanged, so the score measures generalisation to new wordings.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from llavakit.datagen.records import MC_SUFFIX, SHORT_ANSWER_SUFFIX
from llavakit.eval.offline import POSITIONS

POSITION_OPTIONS = "Answer with one of: " + ", ".join(POSITIONS) + "."
TRAIN_SHORT_SUFFIXES = (
    "Answer with a single word.",
    "Reply with one word or a short phrase.",
    "Give a short answer.",
    "Be brief.",
    "Respond in one or two words.",
    "",  # no format line at all
)
TRAIN_MC_SUFFIXES = (
    "Reply with the letter of the correct option.",
    "Pick one option and answer with its letter.",
    "Which letter is right?",
)
TRAIN_PREFIXES = ("", "Look at the image. ", "Quick question: ", "Based on the picture, ", "Please tell me: ")

# For the paraphrased benchmark only (never in training data).
TEST_SHORT_SUFFIX = "Keep the answer to one word or a short phrase."
TEST_TEMPLATES: dict[str, tuple[re.Pattern, tuple[str, ...]]] = {
    "color": (re.compile(r"^What color is the (?P<d>.+)\?$"),
              ("Name the colour of the {d}.", "The {d} is painted in which colour?", "Tell me which colour the {d} has.")),
    "shape": (re.compile(r"^What shape is the (?P<d>.+) object\?$"),
              ("Name the shape of the {d} object.", "The {d} object: what kind of shape is it?",
               "Identify the geometric figure that is {d}.")),
    "count": (re.compile(r"^How many (?P<d>.+) are there in the image\?$"),
              ("Figure out how many {d} appear in this picture.", "What is the number of {d} shown here?",
               "Tell me how many {d} you can see.")),
    "position": (re.compile(r"^Where is the (?P<d>.+) in the image\?$"),
                 ("In which region of the picture does the {d} sit?", "Locate the {d}.",
                  "Point out the region of the picture where the {d} sits.")),
    "existence": (re.compile(r"^Is there (?:a|an) (?P<d>.+) in the image\?$"),
                  ("Can you spot any {d} anywhere in this picture?", "Does this picture contain any {d}?",
                   "Tell me whether a {d} is visible here.")),
}


def vary_turn(text: str, rng: random.Random, prob: float) -> str:
    """One human turn, reworded with probability `prob` (only turns ending in a known format line)."""
    for suffix, alternatives in ((SHORT_ANSWER_SUFFIX, TRAIN_SHORT_SUFFIXES), (MC_SUFFIX, TRAIN_MC_SUFFIXES)):
        if text.rstrip().endswith(suffix) and rng.random() < prob:
            body = text.rstrip()[: -len(suffix)].rstrip("\n")
            image_first = body.startswith("<image>\n")
            image_last = body.endswith("\n<image>")
            core = body.removeprefix("<image>\n") if image_first else body.removesuffix("\n<image>") if image_last else body
            prefix = rng.choice(TRAIN_PREFIXES)
            if prefix and core[:1].isupper() and not core.startswith("I "):
                core = prefix + core[0].lower() + core[1:]
            new_suffix = rng.choice(alternatives)
            out = core + ("\n" + new_suffix if new_suffix else "")
            if image_first:
                out = "<image>\n" + out
            elif image_last:
                out = out + "\n<image>"
            return out
    return text


def options_turn(text: str, answer: str, rng: random.Random, prob: float) -> str | None:
    """A position question's format line replaced by the list of the nine cells (None: unchanged)."""
    if answer.strip() not in POSITIONS or not text.rstrip().endswith(SHORT_ANSWER_SUFFIX) or rng.random() >= prob:
        return None
    body = text.rstrip()[: -len(SHORT_ANSWER_SUFFIX)]
    return body + POSITION_OPTIONS


def vary_records(records: list[dict], prob: float, seed: int, position_options: float = 0.0) -> tuple[list[dict], int]:
    """Records with a fraction of their format-line turns reworded; (records, turns changed).

    `position_options`: fraction of position questions whose format line becomes the list of the
    nine grid cells ("Answer with one of: top left, top, ..."), as the offline benchmark asks.
    """
    changed = 0
    out = []
    for rec in records:
        rng = random.Random(f"{seed}/{rec.get('id')}/phrasing")
        convs = rec["conversations"]
        turns = []
        for i, turn in enumerate(convs):
            if turn.get("from") == "human":
                answer = convs[i + 1]["value"] if i + 1 < len(convs) else ""
                new = options_turn(turn["value"], answer, rng, position_options)
                if new is None:
                    new = vary_turn(turn["value"], rng, prob)
                changed += new != turn["value"]
                turn = {**turn, "value": new}
            turns.append(turn)
        out.append({**rec, "conversations": turns})
    return out, changed


def paraphrase_prompt(prompt: str, task: str, rng: random.Random) -> str | None:
    """The benchmark prompt asked another way (None if the task or question is not one we reword)."""
    if task not in TEST_TEMPLATES:
        return None
    lines = prompt.split("\n")
    if len(lines) < 2 or lines[0] != "<image>":
        return None
    pattern, templates = TEST_TEMPLATES[task]
    m = pattern.match(lines[1])
    if not m:
        return None
    question = rng.choice(templates).format(d=m.group("d"))
    return "\n".join(["<image>", question, TEST_SHORT_SUFFIX])


def paraphrase_benchmark(src: Path, dst: Path, seed: int = 0) -> dict:
    """Write `dst`: the short-answer questions of offline benchmark `src`, reworded (answers unchanged)."""
    doc = json.loads(Path(src).read_text(encoding="utf-8"))
    questions = []
    for q in doc["questions"]:
        rng = random.Random(f"{seed}/{q['question_id']}/paraphrase")
        new = paraphrase_prompt(q["prompt"], q["task"], rng)
        if new is not None:
            questions.append({**q, "prompt": new})
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the world path is relative to the benchmark file's own directory
    world = os.path.relpath((Path(src).parent / doc["world"]).resolve(), dst.parent.resolve())
    doc = {**doc, "questions": questions, "world": world, "paraphrased_from": str(src)}
    dst.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return {"file": str(dst), "questions": len(questions)}

"""`llavakit predict`: LLaVA's eval answer files (model_vqa format), batched and resumable.

In:  one JSON object per line: `question_id`, `text`, optional `image` (relative to --images-dir).
Out: `question_id`, `prompt` (the question text), `text` (the answer), `answer_id`, `model_id`,
`metadata`; appended a batch at a time, so an interrupted run resumes where it stopped. As in
LLaVA's model_vqa, a question with an image but no `<image>` marker gets `<image>\\n` in front.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from llavakit.data.templates import IMAGE_TOKEN
from llavakit.infer.params import SamplingParams
from llavakit.infer.prompt import PromptError


@dataclass(frozen=True)
class Question:
    question_id: object
    text: str
    image: str | None
    line: int


@dataclass(frozen=True)
class Summary:
    total: int
    skipped: int
    answered: int
    out: Path

    def __str__(self) -> str:
        return f"{self.answered} answered, {self.skipped} already in {self.out}, {self.total} questions"


def read_questions(path: str | Path) -> list[Question]:
    """Parse and validate the question file; `ValueError` names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    questions, seen = [], set()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        q = _question(path, n, raw)
        key = json.dumps(q.question_id)
        if key in seen:
            raise ValueError(f"{path}:{n}: duplicate question_id {q.question_id!r}")
        seen.add(key)
        questions.append(q)
    return questions


def _question(path: Path, n: int, raw: str) -> Question:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or "question_id" not in obj or not isinstance(obj.get("text"), str):
        raise ValueError(f"{path}:{n}: each line needs 'question_id' and a string 'text'")
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise ValueError(f"{path}:{n}: 'image' must be a non-empty string")
    return Question(obj["question_id"], obj["text"], image, n)


def done_ids(out: Path) -> set[str]:
    """question_ids already answered in `out`; a torn last line (killed mid-write) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(out, "r+b") as f:
            f.truncate(len(data))
    ids = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                ids.add(json.dumps(json.loads(line)["question_id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{out}:{n}: not an answer line; refusing to append to this file") from None
    return ids


def user_text(q: Question) -> str:
    if q.image is not None and IMAGE_TOKEN not in q.text:
        return f"{IMAGE_TOKEN}\n{q.text}"
    return q.text


def answer_batch(pipe, batch: list[Question], images_dir: Path, params: SamplingParams, model_id: str) -> list[dict]:
    from llavakit.data.images import ImageError, load_image

    items = []
    for q in batch:
        try:
            images = [load_image(images_dir / q.image)] if q.image is not None else []
            items.append(pipe.prompt(images, user_text(q)))
        except (ImageError, PromptError) as exc:
            raise ValueError(f"question {q.question_id!r} (line {q.line}): {exc}") from None
    completions = pipe.run_prompts(items, [params] * len(items))
    return [
        {"question_id": q.question_id, "prompt": q.text, "text": c.text, "answer_id": uuid.uuid4().hex,
         "model_id": model_id, "metadata": {"finish_reason": c.finish_reason}}
        for q, c in zip(batch, completions)
    ]


def predict(pipe, questions_path, images_dir, out_path, params: SamplingParams, model_id: str,
            batch_size: int = 8, progress: bool = True) -> Summary:
    """Answer every question not yet in `out_path`, appending one batch at a time."""
    from tqdm import tqdm

    questions = read_questions(questions_path)
    out = Path(out_path)
    done = done_ids(out)
    todo = [q for q in questions if json.dumps(q.question_id) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="predict", unit="q", disable=not progress, dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f, bar:
        for lo in range(0, len(todo), batch_size):
            batch = todo[lo:lo + batch_size]
            lines = answer_batch(pipe, batch, Path(images_dir), params, model_id)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    return Summary(len(questions), len(questions) - len(todo), len(todo), out)

"""LLaVA JSON records: validation and conversion to chat messages.

A record is `{"id", "image" | "images", "conversations": [{"from": "human"|"gpt", "value"}]}`.
Everything wrong with a record raises `RecordError` naming the record id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llavakit.data.templates import IMAGE_TOKEN

ROLES = {"human": "user", "gpt": "assistant"}


class RecordError(ValueError):
    """A malformed LLaVA record; the message starts with the record id."""

    def __init__(self, record_id: object, reason: str):
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


@dataclass(frozen=True)
class Conversation:
    """A validated record: chat messages plus the image files it references, in order."""

    id: str
    messages: list[dict]
    images: list[str]


def record_images(record: dict) -> list[str]:
    rid = record.get("id")
    if "image" in record and "images" in record:
        raise RecordError(rid, "has both 'image' and 'images'")
    if "image" in record:
        if not isinstance(record["image"], str) or not record["image"]:
            raise RecordError(rid, "'image' must be a non-empty string")
        return [record["image"]]
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise RecordError(rid, "'images' must be a list of non-empty strings")
    return list(images)


def parse_record(record: object) -> Conversation:
    """Validate one LLaVA record and turn it into chat messages."""
    if not isinstance(record, dict):
        raise RecordError(None, f"a record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if rid is None or not isinstance(rid, (str, int)):
        raise RecordError(rid, "missing or invalid 'id'")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError(rid, "'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise RecordError(rid, f"turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.120}")
        role = ROLES[turn["from"]]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(rid, f"turn {i} is from {turn['from']!r}; turns must alternate human, gpt, ...")
        if role == "assistant" and IMAGE_TOKEN in turn["value"]:
            raise RecordError(rid, f"turn {i}: {IMAGE_TOKEN} may only appear in human turns")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise RecordError(rid, "the last turn must be from 'gpt' (nothing to train on otherwise)")
    images = record_images(record)
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if markers != len(images):
        raise RecordError(rid, f"has {len(images)} image(s) but {markers} {IMAGE_TOKEN} marker(s)")
    return Conversation(id=str(rid), messages=messages, images=images)


def load_records(path: str | Path) -> list[dict]:
    """Read a LLaVA JSON list (or JSONL) file; errors name the file and position."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".jsonl":
        return [_json_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None

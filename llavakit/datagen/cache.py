"""Append-only cache of teacher outcomes: one JSONL file per kind in the cache directory.

Each line is one finished item, keyed by sha256 of (teacher, model, prompt-pack version, image
id, kind, inputs: a digest of everything else that decides the teacher's output, see
`teacher_inputs`), written with a single `write()` as soon as it is done (a killed process loses
nothing) and fsynced by the first write at least `fsync_interval` seconds after the last fsync, and on
close (a power cut can lose the lines since). A record is either fully in the cache or not at
all: a line counts only if it ends with a newline, parses, and its key matches its fields. A torn
last line (the process or the machine died mid-write) is counted, cut off, and its item redone.

Only one run may use a cache directory at a time (an exclusive `flock` on `.lock`; the kernel
releases it when a process dies, so a killed run never blocks the next one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavakit.datagen.config import DatagenError


def cache_key(teacher: str, model: str, prompt_version: str, image_id: Any, kind: str, inputs: str) -> str:
    payload = json.dumps([teacher, model, prompt_version, str(image_id), kind, inputs], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def inputs_digest(inputs: Any) -> str:
    """sha256 of a teacher's inputs (JSON data: the messages it is shown, its sampling settings, ...)."""
    return hashlib.sha256(json.dumps(inputs, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheStats:
    lines: int = 0
    torn: int = 0
    """Incomplete last lines (cut off and redone)."""
    invalid: int = 0
    """Complete lines that do not parse or whose key does not match (ignored)."""
    duplicates: int = 0
    """Extra lines for a key already present (the best outcome is used)."""

    def to_json(self) -> dict:
        return dict(lines=self.lines, torn=self.torn, invalid=self.invalid, duplicates=self.duplicates)


@dataclass
class Cache:
    root: Path
    fsync_interval: float = 0.2
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._fds: dict[str, int] = {}
        self._entries: dict[str, dict[str, dict]] = {}
        self._lock_fd: int | None = None
        self._dirty: set[int] = set()
        self._last_sync = time.monotonic()

    # -- lifecycle

    def open(self) -> Cache:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatagenError(f"cache dir {self.root} is in use by another datagen run") from None
        self._lock_fd = fd
        return self

    def close(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Cache:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading

    def path(self, kind: str) -> Path:
        return self.root / f"{kind}.jsonl"

    def load(self, kind: str) -> dict[str, dict]:
        """All valid entries of a kind (key -> entry); cuts a torn tail so appends stay line-aligned."""
        path = self.path(kind)
        entries: dict[str, dict] = {}
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                self.stats.torn += 1
                with open(path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
            for raw in data[:end].split(b"\n"):
                if not raw.strip():
                    continue
                self.stats.lines += 1
                entry = self._decode(raw, kind)
                if entry is None:
                    self.stats.invalid += 1
                    continue
                old = entries.get(entry["key"])
                if old is not None:
                    self.stats.duplicates += 1
                    if old["status"] == "ok":
                        continue
                entries[entry["key"]] = entry
        self._entries[kind] = entries
        return entries

    @staticmethod
    def _decode(raw: bytes, kind: str) -> dict | None:
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        try:
            ok = (
                entry["kind"] == kind
                and entry["status"] in ("ok", "rejected")
                and entry["key"] == cache_key(entry["teacher"], entry["model"], entry["prompt_version"],
                                              entry["image_id"], entry["kind"], entry["inputs"])
                and (entry["status"] != "ok" or isinstance(entry.get("output"), dict))
            )
        except (KeyError, TypeError):
            return None
        return entry if ok else None

    def get(self, kind: str, key: str) -> dict | None:
        return self._entries.get(kind, {}).get(key)

    # -- writing

    def append(self, entry: dict) -> None:
        kind = entry["kind"]
        fd = self._fds.get(kind)
        if fd is None:
            if kind not in self._entries:
                self.load(kind)  # also repairs a torn tail before the first append
            fd = os.open(self.path(kind), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fds[kind] = fd
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:  # a regular-file write is complete unless the disk is full; loop for safety
            n = os.write(fd, view)
            view = view[n:]
        self._entries.setdefault(kind, {})[entry["key"]] = entry
        self._dirty.add(fd)
        now = time.monotonic()
        if self.fsync_interval == 0 or now - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        for fd in self._dirty:
            os.fsync(fd)
        self._dirty.clear()
        self._last_sync = time.monotonic()

"""Typed, validated configuration of every datagen command (the CLI only fills these in)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from llavakit.datagen import KINDS


class DatagenError(ValueError):
    """A datagen run cannot proceed as configured; the message names the culprit."""


def _file(path: Path | str | None, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise DatagenError(f"{what} not found: {path}")
    return path


def _dir(path: Path | str, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatagenError(f"{what} not found (or not a directory): {path}")
    return path


@dataclass
class SourceConfig:
    """Where the annotations and images are.

    `annotations` may be a world directory (with `annotations/instances.json`), an annotations
    directory (with `instances.json`), or a COCO instances file (e.g. `instances_train2017.json`).
    Captions default to the sibling `captions*.json`, scenes to the world's `scenes.jsonl`.
    """

    annotations: Path
    """World dir, annotations dir, or a COCO instances JSON file."""
    images_dir: Path
    """Directory that the records' `image` paths are relative to."""
    captions: Path | None = None
    """COCO captions JSON (default: found next to the instances file)."""
    scenes: Path | None = None
    """World scene graphs, JSONL (default: `scenes.jsonl` of the world dir when present)."""
    limit: int | None = None
    """Use only the first N images (by id)."""
    allow_missing_images: bool = False
    """Skip (and count) images whose file is missing instead of failing."""

    def __post_init__(self) -> None:
        self.annotations = Path(self.annotations)
        self.images_dir = _dir(self.images_dir, "images dir")
        explicit_captions, explicit_scenes = self.captions is not None, self.scenes is not None
        self.instances, auto_captions, auto_scenes = self._resolve(self.annotations)
        self.captions = _file(self.captions, "captions file") if explicit_captions else auto_captions
        self.scenes = _file(self.scenes, "scenes file") if explicit_scenes else auto_scenes
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DatagenError(f"limit must be a positive integer, got {self.limit!r}")

    @staticmethod
    def _resolve(a: Path) -> tuple[Path, Path | None, Path | None]:
        def opt(p: Path) -> Path | None:
            return p if p.is_file() else None

        if a.is_dir():
            if (a / "annotations" / "instances.json").is_file():
                ann = a / "annotations"
                return ann / "instances.json", opt(ann / "captions.json"), opt(a / "scenes.jsonl")
            if (a / "instances.json").is_file():
                return a / "instances.json", opt(a / "captions.json"), opt(a.parent / "scenes.jsonl")
            raise DatagenError(f"annotations: {a} holds neither annotations/instances.json nor instances.json")
        if not a.is_file():
            raise DatagenError(f"annotations not found: {a}")
        captions = opt(a.with_name(a.name.replace("instances", "captions"))) if "instances" in a.name else None
        scenes = opt(a.parent.parent / "scenes.jsonl") if a.parent.name == "annotations" else None
        return a, captions, scenes

    def load(self):
        """Read the annotations (see `llavakit.datagen.annotations.load_dataset`)."""
        from llavakit.datagen.annotations import load_dataset

        return load_dataset(self.instances, self.images_dir, captions=self.captions, scenes=self.scenes,
                            allow_missing_images=self.allow_missing_images, limit=self.limit)


@dataclass
class TeacherConfig:
    """Which teacher answers the prompts, and how it is called."""

    name: str = "offline"
    """offline | openai | hf."""
    model: str | None = None
    """openai: the model name sent to the server; hf: a local model directory; offline: unused."""
    url: str | None = None
    """openai: base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."""
    key_env: str = "OPENAI_API_KEY"
    """openai: name of the environment variable holding the API key (unset = no Authorization header)."""
    concurrency: int = 4
    """openai: most requests in flight at once."""
    timeout: float = 120.0
    """openai: seconds per request."""
    max_retries: int = 5
    """openai: retries of one request on 429, 5xx, timeouts and connection errors."""
    backoff: float = 1.0
    """openai: first backoff delay in seconds (doubles per retry, with jitter)."""
    backoff_max: float = 60.0
    """openai: longest backoff delay (a server's Retry-After is honoured up to 300 s)."""
    temperature: float = 0.7
    """openai/hf: sampling temperature (0 = greedy)."""
    max_tokens: int = 1024
    """openai/hf: longest completion in tokens."""
    seed: int = 0
    """offline: seed of the question/answer sampler (part of its model id, so part of the cache key)."""

    def __post_init__(self) -> None:
        from llavakit.datagen.teachers import TEACHERS

        if self.name not in TEACHERS:
            raise DatagenError(f"unknown teacher {self.name!r}; known: {', '.join(TEACHERS)}")
        if self.name == "openai":
            if not self.url:
                raise DatagenError("teacher openai needs --teacher-url (e.g. http://127.0.0.1:8000/v1)")
            if not self.url.startswith(("http://", "https://")):
                raise DatagenError(f"--teacher-url must start with http:// or https://, got {self.url!r}")
            if not self.model:
                raise DatagenError("teacher openai needs --teacher-model (the model name the server expects)")
        if self.name == "hf":
            if not self.model:
                raise DatagenError("teacher hf needs --teacher-model (a local transformers model directory)")
            if not Path(self.model).is_dir():
                raise DatagenError(f"teacher hf: model directory not found: {self.model}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise DatagenError(f"concurrency must be a positive integer, got {self.concurrency!r}")
        for name in ("timeout", "backoff_max"):
            v = getattr(self, name)
            if not (v > 0) or math.isinf(v):
                raise DatagenError(f"{name} must be a positive number of seconds, got {v!r}")
        if not (self.backoff >= 0):
            raise DatagenError(f"backoff must be >= 0, got {self.backoff!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise DatagenError(f"max_retries must be a non-negative integer, got {self.max_retries!r}")
        if not (0 <= self.temperature <= 2):
            raise DatagenError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise DatagenError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


def parse_kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = tuple(kinds)
    if not kinds:
        raise DatagenError(f"no kinds given; choose from {', '.join(KINDS)}")
    for k in kinds:
        if k not in KINDS:
            raise DatagenError(f"unknown kind {k!r}; known: {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise DatagenError(f"duplicate kind in {', '.join(kinds)}")
    return kinds


def _out(path: Path | str, what: str = "output") -> Path:
    path = Path(path)
    if path.is_dir():
        raise DatagenError(f"{what} {path} is a directory; give a file name such as data.json")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class InstructConfig:
    """`llavakit datagen` (instruct): conversation / detail / reasoning records from a teacher."""

    source: SourceConfig
    out: Path
    """The LLaVA JSON to write (atomically); the report goes next to it (`*.report.json`)."""
    cache_dir: Path
    """Append-only cache of teacher outputs (one JSONL per kind); reruns and resumes read it."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    kinds: tuple[str, ...] = KINDS
    prompt_dir: Path | None = None
    """Directory whose pack / list files override the built-in ones."""
    seed: int = 0
    """Seed of record-level choices (<image> placement, detail question)."""
    attempts: int = 2
    """Teacher calls per item when the output is rejected (only for non-deterministic teachers)."""
    retry_rejected: bool = False
    """Ask the teacher again for items whose cached output was rejected."""
    fsync_interval: float = 0.2
    """Seconds between fsyncs of the cache (0 = after every record). A killed process loses nothing
    either way: every record is written with a single write() as soon as it is done."""
    max_consecutive_failures: int = 25
    """Abort when this many items in a row fail in the teacher (server down, wrong model, ...)."""
    progress: bool = True

    def __post_init__(self) -> None:
        self.kinds = parse_kinds(self.kinds)
        self.out = _out(self.out)
        self.cache_dir = Path(self.cache_dir)
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise DatagenError(f"cache dir {self.cache_dir} exists and is not a directory")
        if self.prompt_dir is not None:
            self.prompt_dir = _dir(self.prompt_dir, "prompt dir")
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise DatagenError(f"attempts must be a positive integer, got {self.attempts!r}")
        if not (self.fsync_interval >= 0):
            raise DatagenError(f"fsync_interval must be >= 0, got {self.fsync_interval!r}")
        if self.max_consecutive_failures < 1:
            raise DatagenError("max_consecutive_failures must be >= 1")


@dataclass
class CaptionsConfig:
    """`llavakit datagen captions`: stage-1 (LCS-558K style) caption records."""

    source: SourceConfig
    out: Path
    per_image: str = "one"
    """'one' caption per image (drawn with the seed) or 'all' (one record per caption)."""
    prompt_dir: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.out = _out(self.out)
        if self.per_image not in ("one", "all"):
            raise DatagenError(f"per_image must be 'one' or 'all', got {self.per_image!r}")
        if self.prompt_dir is not None:
            self.prompt_dir = _dir(self.prompt_dir, "prompt dir")


@dataclass
class VQAConfig:
    """`llavakit datagen vqa`: LLaVA-1.5 style short-answer and multiple-choice items."""

    source: SourceConfig
    out: Path
    questions_per_image: int = 4
    """Short-answer questions per image (one multi-turn record per image); 0 = none."""
    mc_per_image: int = 1
    """Multiple-choice items per image (one record each); 0 = none."""
    types: tuple[str, ...] | None = None
    """Question types to use (default: all that apply)."""
    seed: int = 0

    def __post_init__(self) -> None:
        from llavakit.datagen.sceneqa import QTYPES

        self.out = _out(self.out)
        for name in ("questions_per_image", "mc_per_image"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise DatagenError(f"{name} must be a non-negative integer, got {v!r}")
        if self.questions_per_image == 0 and self.mc_per_image == 0:
            raise DatagenError("questions_per_image and mc_per_image are both 0: nothing to generate")
        if isinstance(self.types, str):
            self.types = tuple(t.strip() for t in self.types.split(",") if t.strip())
        if self.types is not None:
            for t in self.types:
                if t not in QTYPES:
                    raise DatagenError(f"unknown question type {t!r}; known: {', '.join(QTYPES)}")


@dataclass
class MixSource:
    """One input of a mix: a LLaVA JSON file and how much of it to take."""

    path: Path
    ratio: float = 1.0
    """Multiplier of the source size: 0.5 takes a random half, 2.0 takes everything twice."""

    def __post_init__(self) -> None:
        self.path = _file(self.path, "mix source")
        if not (self.ratio >= 0) or math.isinf(self.ratio):
            raise DatagenError(f"mix source {self.path}: ratio must be a finite number >= 0, got {self.ratio!r}")

    @classmethod
    def parse(cls, spec: str) -> MixSource:
        """'data.json' or 'data.json:0.5'."""
        path, sep, ratio = spec.rpartition(":")
        if sep and path and not ratio.startswith(("/", "\\")):
            try:
                return cls(Path(path), float(ratio))
            except ValueError as exc:
                if "could not convert" not in str(exc):
                    raise
        return cls(Path(spec), 1.0)


@dataclass
class MixConfig:
    """`llavakit datagen mix`: combine LLaVA JSON sources with ratios and a seed."""

    sources: list[MixSource]
    out: Path
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, MixSource) else MixSource.parse(str(s)) for s in self.sources]
        if not self.sources:
            raise DatagenError("mix needs at least one --source")
        self.out = _out(self.out)
        if any(self.out.resolve() == s.path.resolve() for s in self.sources):
            raise DatagenError(f"mix output {self.out} is also one of its sources")

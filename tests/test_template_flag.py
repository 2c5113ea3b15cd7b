"""`--template NAME` on `llavakit chat` / `predict`: prompt a model with a registered template instead of its own."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llavakit.cli import main
from test_interop_hf import tiny_llava_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KNOWN = "known: chatml, llava_v1, plain, tokenizer, vicuna_v1"
VICUNA_SYSTEM = "A chat between a curious human and an artificial intelligence assistant."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A llava-hf-style dir whose own template (llava-1.5-hf's: content-part lists) llavakit cannot use."""
    return tiny_llava_hf(tmp_path_factory.mktemp("hf") / "llava-hf")


@pytest.fixture
def red_png(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path


@pytest.fixture
def rendered(monkeypatch):
    """Every prompt text the inference path renders (llavakit.infer.prompt.render_text)."""
    import llavakit.infer.prompt as prompt

    texts, real = [], prompt.render_text

    def spy(*args, **kw):
        texts.append(real(*args, **kw))
        return texts[-1]

    monkeypatch.setattr(prompt, "render_text", spy)
    return texts


def expected_answer(model_dir, image, question, max_new_tokens, template):
    from llavakit.infer.api import Pipeline
    from llavakit.interop.hf import load_any

    pipe = Pipeline(load_any(model_dir, template=template), fast=False)
    return pipe.generate([([image], f"<image>\n{question}")], max_new_tokens=max_new_tokens)[0]


def test_chat_one_shot_with_template_on_llava_hf_dir(hf_dir, red_png, rendered, capsys):
    rc = main(["chat", "--model", str(hf_dir), "--template", "vicuna_v1", "--image", str(red_png),
               "What is this?", "--max-new-tokens", "8", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(rendered) == 1
    text = rendered[0]
    with Image.open(red_png) as image:
        want = expected_answer(hf_dir, image.convert("RGB"), "What is this?", 8, "vicuna_v1")
    assert out == want + "\n" and want.strip()
    assert text.startswith("<s>" + VICUNA_SYSTEM) and text.endswith("What is this? ASSISTANT:")
    assert "USER: <image>" in text


def test_chat_without_template_points_to_the_flag(hf_dir, red_png, capsys):
    rc = main(["chat", "--model", str(hf_dir), "--image", str(red_png), "What is this?", "--max-new-tokens", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "its chat template cannot be used by llavakit" in err and "pass --template" in err


@pytest.mark.parametrize("command", ["chat", "predict", "serve"])
def test_unknown_template_lists_the_known_ones(command, tmp_path, capsys):
    """Checked before the model is resolved or loaded (or a server started): the model path does not even exist."""
    args = ["--model", str(tmp_path / "missing"), "--template", "vicuna"]
    extra = {"chat": ["Hi"], "serve": ["--port", "0"],
             "predict": ["--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "a.jsonl")]}[command]
    assert main([command, *args, *extra]) == 1
    err = capsys.readouterr().err
    assert f"llavakit {command}: error: unknown chat template 'vicuna'; {KNOWN}" in err


def test_predict_with_template(hf_dir, red_png, tmp_path, rendered, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 1, "image": red_png.name, "text": "What colour is it?"},
        {"question_id": 2, "text": "Hello?"},
    ]))
    out = tmp_path / "answers.jsonl"
    rc = main(["predict", "--model", str(hf_dir), "--template", "vicuna_v1", "--questions", str(questions),
               "--images-dir", str(red_png.parent), "--out", str(out), "--max-new-tokens", "4", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [1, 2]
    assert rendered and all(t.startswith("<s>" + VICUNA_SYSTEM) and t.endswith(" ASSISTANT:") for t in rendered)
    assert any("USER: <image>" in t and "What colour is it?" in t for t in rendered)


def test_load_pipeline_with_template_prompts_with_it(hf_dir):
    """The Python API (what `serve --template` uses) takes the same override."""
    from llavakit.infer.api import load_pipeline

    pipe = load_pipeline(hf_dir, template="vicuna_v1", threads=1)
    assert pipe.lm.template.name == "vicuna_v1"
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        load_pipeline(hf_dir, template="vicuna")


def test_template_overrides_a_llavakit_dir_for_inference_only(tiny_model_dir):
    from llavakit.model.hfdirs import load_with_template

    lm = load_with_template(tiny_model_dir, "plain")
    assert lm.template.name == "plain" and lm.meta.template["name"] == "plain"
    assert json.loads((tiny_model_dir / "config.json").read_text())["llavakit"]["template"]["name"] == "vicuna_v1"
    with pytest.raises(ValueError, match=r"template 'chatml' needs tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        load_with_template(tiny_model_dir, "chatml")

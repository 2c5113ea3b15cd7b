"""Every subcommand answers --help; `llavakit init` and `data inspect` work end to end."""

from __future__ import annotations

import argparse
import json

import pytest

from llavakit.cli import build_parser, main


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def all_commands() -> list[tuple[str, ...]]:
    return list(_walk(build_parser()))


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "llavakit")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage: llavakit" in capsys.readouterr().out


def test_core_commands_registered():
    names = {p[0] for p in all_commands() if p}
    assert {"init", "data"} <= names


def test_init_cli_writes_hf_llava_dir(tiny_parts, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "model"
    rc = main(["init", "--vision", str(tiny_parts["clip"]), "--lm", str(tiny_parts["llama"]),
               "--projector", "mlp2x_gelu", "--template", "chatml", "--out", str(out)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((out / "config.json").read_text())["llavakit"]["template"]["name"] == "chatml"


def test_init_cli_error_is_clear(tiny_parts, tmp_path, capsys):
    rc = main(["init", "--vision", str(tiny_parts["clip"]), "--lm", str(tiny_parts["llama"]),
               "--template", "vicuna", "--out", str(tmp_path / "m")])
    assert rc == 1
    assert "unknown chat template 'vicuna'" in capsys.readouterr().err


def test_file_errors_are_one_line_naming_the_path(tiny_parts, tmp_path, capsys):
    out = tmp_path / "m"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["init", "--vision", str(tiny_parts["clip"]), "--lm", str(tiny_parts["llama"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"output dir {out} exists and is not empty" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"


def test_data_inspect_and_check(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    good = {"id": "g", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}
    bad = {"id": "b", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}
    data.write_text(json.dumps([good, bad]))
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "<image x16>" in out and "[[ Red.</s>]]" in out
    assert main(["data", "check", str(data), "--model", str(tiny_model_dir)]) == 1
    out = capsys.readouterr().out
    assert "record 'b': has 0 image(s) but 1 <image> marker(s)" in out and "1 ok, 1 bad" in out

"""The reliability corpus: bad inputs of every kind, built in code, pushed through the training data
loader, datagen, chat and the server.

Each bad input gets an error naming its culprit (file, record id, request field) or a counted
skip, and the good items beside it in the same batch, run or server are kept. Valid but unusual
image modes (grayscale, RGBA, CMYK, 16-bit, palette) are converted to RGB and used, never refused.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.data.images import ImageError, decode_image, load_image

RED = (200, 30, 30)
QUESTION = "<image>\nWhat is this?"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the image corpus -------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _rgba() -> Image.Image:
    img = Image.new("RGBA", (40, 30), RED + (255,))
    img.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent (black underneath)
    return img


def _palette_transparent() -> bytes:
    img = Image.new("RGB", (40, 30), RED)
    img.paste((0, 0, 255), (0, 0, 20, 30))
    p = img.quantize(colors=2)
    blue = next(i for i, c in enumerate(p.getpalette()[:6][::3]) if p.getpalette()[3 * i:3 * i + 3] == [0, 0, 255])
    return encode(p, transparency=blue)


def _unusual() -> dict[str, tuple[bytes, str, tuple, tuple]]:
    """name -> (bytes, extension, expected RGB at (0, 0), expected RGB at (39, 29)).

    16-bit is scaled by its full range (40000 / 257 = 156); transparency is composited on white.
    """
    rgb = Image.new("RGB", (40, 30), RED)
    grey = rgb.convert("L").getpixel((0, 0))
    return {
        "grayscale": (encode(rgb.convert("L")), "png", (grey,) * 3, (grey,) * 3),
        "rgba": (encode(_rgba()), "png", (255, 255, 255), RED),
        "cmyk": (encode(rgb.convert("CMYK"), "JPEG", quality=95), "jpg", RED, RED),
        "16-bit": (encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))), "png", (156,) * 3, (156,) * 3),
        "palette": (encode(rgb.quantize(colors=4)), "png", RED, RED),
        "palette-transparent": (_palette_transparent(), "png", (255, 255, 255), RED),
    }


def _bad() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, extension, what the error must say besides the file name)."""
    good = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)))
    corrupt, broken_header = bytearray(good), bytearray(good)
    corrupt[len(good) // 2:len(good) // 2 + 8] = b"\xff" * 8  # inside the compressed pixel data
    broken_header[40:48] = b"\xff" * 8  # a chunk header: Pillow no longer recognises the file as a PNG
    return {
        "zero-byte": (b"", "png", "empty file (0 bytes)"),
        "truncated": (good[: len(good) // 2], "png", "corrupt or truncated"),
        "corrupt": (bytes(corrupt), "png", "corrupt or truncated image (broken data stream"),
        "broken-header": (bytes(broken_header), "png", "not an image"),
        "decompression-bomb": (declared_png(100_000, 100_000), "png", "decompression bomb"),
        "huge-dimensions": (declared_png(8000, 6000), "png", "8000x6000 = 48000000 pixels exceeds the limit"),
        "thin-strip": (declared_png(4000, 8), "png", "aspect ratio 500:1 exceeds the limit"),
        "text-as-png": (b"colour,place\nred,top left\n", "png", "not an image"),
        "html-as-jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "jpg", "not an image"),
        "eps-as-png": (encode(Image.new("RGB", (8, 8)), "EPS"), "png", "not one of the accepted formats"),
    }


UNUSUAL, BAD = _unusual(), _bad()
DECODED_BAD = ("truncated", "corrupt")
"""Bad files whose header is fine: found when decoded (the training index pass reads headers only)."""


def close(a: tuple, b: tuple, tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every corpus image as a file (`<name>.<ext>`), plus four good RGB images `good-<i>.png`."""
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for name, (data, ext, *_) in {**UNUSUAL, **BAD}.items():
        out[name] = root / f"{name}.{ext}"
        out[name].write_bytes(data)
    for i in range(4):
        out[f"good-{i}"] = root / f"good-{i}.png"
        Image.new("RGB", (36 + 4 * i, 30), (40 * i, 200, 30)).save(out[f"good-{i}"])
    return out


# ---- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_modes_are_converted_to_rgb(files, name):
    _, _, left, right = UNUSUAL[name]
    img = load_image(files[name])
    assert img.mode == "RGB" and img.size == (40, 30)
    assert close(img.getpixel((0, 0)), left) and close(img.getpixel((39, 29)), right), img.getpixel((0, 0))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_raise_naming_the_file(files, name):
    with pytest.raises(ImageError) as exc:
        load_image(files[name])
    assert str(exc.value).startswith(str(files[name])) and BAD[name][2] in str(exc.value)


def test_missing_files_and_configured_limits(tmp_path, files):
    from llavakit.data.images import ImageLimits

    with pytest.raises(ImageError, match="nope.png: image file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="good-0.png: .* bytes exceeds the limit of 10$"):
        load_image(files["good-0"], ImageLimits(max_bytes=10))  # refused from its size, before reading it
    with pytest.raises(ImageError, match="upload: 40x30 = 1200 pixels exceeds the limit of 1000"):
        decode_image(UNUSUAL["grayscale"][0], "upload", ImageLimits(max_pixels=1000))


# ---- the training data loader -----------------------------------------------------------------


def _turns(question: str, answer: str = "A picture.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _records(files: dict[str, Path]) -> tuple[list, dict[str, str], dict[str, str], list[str]]:
    """(records, {id: index-pass reason}, {id: load-time reason}, usable ids)."""
    good = [{"id": f"good-{i}", "image": files[f"good-{i}"].name, "conversations": _turns(QUESTION)} for i in range(4)]
    good.append({"id": "text-only", "conversations": _turns("Say hi.", "Hi.")})
    unusual = [{"id": f"mode-{n}", "image": files[n].name, "conversations": _turns(QUESTION)} for n in UNUSUAL]
    bad_images = [{"id": f"img-{n}", "image": files[n].name, "conversations": _turns(QUESTION)} for n in BAD]
    index_bad = {
        "missing-image": ({"image": "nope.png", "conversations": _turns(QUESTION)}, "image file not found"),
        "two-markers": ({"image": "good-0.png", "conversations": _turns("<image>\n<image>\nWhat?")},
                        "has 1 image(s) but 2 <image> marker(s)"),
        "no-marker": ({"image": "good-0.png", "conversations": _turns("What is this?")}, "has 1 image(s) but 0 <image>"),
        "marker-in-answer": ({"conversations": _turns("Hi.", "<image>")}, "may only appear in human turns"),
        "over-long": ({"conversations": _turns("Tell me everything.", "blue green red " * 400)}, "> max_length 256"),
        "no-conversations": ({"image": "good-0.png"}, "'conversations' must be a non-empty list"),
        "bad-role": ({"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
                     "turn 0 must be"),
        "value-not-text": ({"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "x"}]},
                           "turn 0 must be"),
        "last-turn-human": ({"conversations": [{"from": "human", "value": "hi"}]}, "the last turn must be from 'gpt'"),
    }
    records = good + unusual + bad_images + [{"id": k, **r} for k, (r, _) in index_bad.items()]
    records += [["not", "a", "record"], {"conversations": _turns("Hi.")}]  # no id: named by position
    n = len(records)
    at_index = {k: why for k, (_, why) in index_bad.items()}
    at_index |= {f"#{n - 2}": "a record must be a JSON object", f"#{n - 1}": "missing or invalid 'id'"}
    at_index |= {f"img-{k}": v[2] for k, v in BAD.items() if k not in DECODED_BAD}  # the index reads headers
    at_load = {f"img-{k}": (files[k].name, v[2]) for k, v in BAD.items() if k in DECODED_BAD}
    return records, at_index, at_load, [r["id"] for r in good + unusual]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from llavakit.model.io import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def corpus_data(files, tmp_path_factory):
    records, at_index, at_load, usable = _records(files)
    path = tmp_path_factory.mktemp("records") / "data.json"
    path.write_text(json.dumps(records))
    return {"path": path, "records": records, "at_index": at_index, "at_load": at_load, "usable": usable}


def test_index_pass_names_every_bad_record_and_keeps_the_rest(lm, files, corpus_data):
    from llavakit.data.render import RenderOptions
    from llavakit.train.data import Source, build_index

    opts = RenderOptions(lm.image_seq_length, max_length=256)
    source = Source(corpus_data["records"], lm.tokenizer, lm.template, opts, files["good-0"].parent, lm.image_processor)
    index = build_index(source, num_workers=0)
    reasons = {f.id: f.reason for f in index.failures}
    assert set(reasons) == set(corpus_data["at_index"])
    for rid, why in corpus_data["at_index"].items():
        assert why in reasons[rid], (rid, reasons[rid])
    kept = {str(corpus_data["records"][p]["id"]) for p in index.positions}
    assert kept == set(corpus_data["usable"]) | set(corpus_data["at_load"])  # images are decoded lazily


def test_a_batch_with_every_bad_image_keeps_its_good_samples(lm, files, corpus_data):
    """One batch through the real DataLoader (a worker process): bad images come back as named failures."""
    from llavakit.data.render import RenderOptions
    from llavakit.train.data import Source, make_loader

    records = corpus_data["records"]
    every_bad = {f"img-{k}": (files[k].name, v[2]) for k, v in BAD.items()}  # as a worker meets them, unindexed
    ids = corpus_data["usable"] + list(every_bad)
    positions = [next(i for i, r in enumerate(records) if isinstance(r, dict) and r.get("id") == rid) for rid in ids]
    source = Source(records, lm.tokenizer, lm.template, RenderOptions(lm.image_seq_length), files["good-0"].parent,
                    lm.image_processor)
    (batch,) = list(make_loader(source, [positions], num_workers=1, pad_token_id=lm.tokenizer.pad_token_id))
    assert batch.ids == corpus_data["usable"]
    assert batch.pixel_values.shape[0] == len(corpus_data["usable"]) - 1  # every sample but text-only has one image
    reasons = {f.id: f.reason for f in batch.failures}
    assert set(reasons) == set(every_bad)
    for rid, (file, why) in every_bad.items():
        assert f"{file}: " in reasons[rid] and why in reasons[rid], (rid, reasons[rid])


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_training_skips_and_counts_or_stops_naming_the_record(tiny_model_dir, files, corpus_data, tmp_path, mode):
    from llavakit.train.config import TrainConfig
    from llavakit.train.trainer import train

    n_indexed = len(corpus_data["usable"]) + len(corpus_data["at_load"])  # what the index pass keeps: one batch
    cfg = TrainConfig.from_dict({
        "stage": "align", "init_from": str(tiny_model_dir), "out": str(tmp_path / "run"),
        "data": {"path": str(corpus_data["path"]), "image_folder": str(files["good-0"].parent), "num_workers": 0,
                 "eval_size": 0, "max_length": 256, "on_bad_record": mode, "group_by_length": False},
        "optim": {"batch_size": n_indexed, "micro_batch_size": n_indexed, "epochs": 1},
        "eval": {"at_start": False}, "log": {"progress": False, "tensorboard": False, "plot": False},
    })
    if mode == "error":
        first = next(r["id"] for r in corpus_data["records"]  # the first bad one in file order
                     if isinstance(r, dict) and r.get("id") in corpus_data["at_index"])
        with pytest.raises(ValueError, match=f"record '{first}': .*{re.escape(corpus_data['at_index'][first])}.* more bad record"):
            train(cfg)
        return
    report = json.loads((train(cfg) / "report.json").read_text())
    skipped = {s["id"]: s["reason"] for s in report["skipped"]["records"]}
    assert report["skipped"]["count"] == len(corpus_data["at_index"]) + len(corpus_data["at_load"]) == len(skipped)
    assert set(skipped) == set(corpus_data["at_index"]) | set(corpus_data["at_load"])
    assert report["steps"] == 1 and report["final_loss"] > 0  # one step over the usable records of the batch
    assert report["records"] == {"train": n_indexed, "eval": 0, "dropped_incomplete_batch_per_epoch": 0}


def test_data_files_that_are_not_utf8_or_not_a_list_are_named(tmp_path):
    from llavakit.data.records import load_records

    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8 text \(byte 12\)"):
        load_records(tmp_path / "latin1.json")
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(ValueError, match="obj.json: expected a JSON list of records, got dict"):
        load_records(tmp_path / "obj.json")
    (tmp_path / "lines.jsonl").write_text('{"id": 1}\n{"id": 2,\n')
    with pytest.raises(ValueError, match="lines.jsonl:2: invalid JSON"):
        load_records(tmp_path / "lines.jsonl")


# ---- datagen ----------------------------------------------------------------------------------


def make_coco(root: Path) -> Path:
    """Three images with one box and one caption each; returns the annotations dir."""
    (root / "images").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    for im in images:
        Image.new("RGB", (64, 48), RED).save(root / "images" / im["file_name"])
    inst = {"images": images, "categories": [{"id": 1, "name": "dog", "supercategory": "animal"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3)]}
    (root / "instances.json").write_text(json.dumps(inst))
    caps = {"annotations": [{"id": i, "image_id": i, "caption": f"A dog, number {i}."} for i in (1, 2, 3)]}
    (root / "captions.json").write_text(json.dumps(caps))
    return root


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


DATAGEN_CASES = {
    "instances-not-utf8": (lambda r: (r / "instances.json").write_bytes(
        (r / "instances.json").read_text().replace("dog", "d\u00f6g").encode("latin-1")),
        r"instances.json: not UTF-8 text \(byte \d+\)"),
    "captions-not-utf8": (lambda r: (r / "captions.json").write_bytes(b'{"annotations": ["\xff"]}'),
                          r"captions.json: not UTF-8 text \(byte 18\)"),
    "scenes-not-utf8": (lambda r: (r / "scenes.jsonl").write_bytes(b'{"image_id": 1}\n{"image_id": "\xe9"}\n'),
                        r"scenes.jsonl: not UTF-8 text \(byte 30\)"),
    "scene-bad-json": (lambda r: (r / "scenes.jsonl").write_text('{"image_id": 1}\n{"image_id": \n'),
                       r"scenes.jsonl:2: invalid JSON"),
    "not-coco": (lambda r: (r / "instances.json").write_text("[1, 2]"), "instances.json: not a COCO instances file"),
    "image-not-object": (lambda r: _edit(r / "instances.json", lambda d: d["images"].__setitem__(1, "2.jpg")),
                         "instances.json: an image must be a JSON object, got '2.jpg'"),
    "image-id-list": (lambda r: _edit(r / "instances.json", lambda d: d["images"][1].__setitem__("id", [2])),
                      "instances.json: an image: 'id' must be an integer or a string, got \\[2\\]"),
    "width-text": (lambda r: _edit(r / "instances.json", lambda d: d["images"][1].__setitem__("width", "wide")),
                   "instances.json: image 2: width must be a number, got 'wide'"),
    "bbox-text": (lambda r: _edit(r / "instances.json", lambda d: d["annotations"][1].__setitem__("bbox", ["a", 1, 2, 3])),
                  "instances.json: annotation 2 of image 2: bbox value must be a number, got 'a'"),
    "bbox-short": (lambda r: _edit(r / "instances.json", lambda d: d["annotations"][1].__setitem__("bbox", [1, 2])),
                   "instances.json: annotation 2 of image 2: bbox must be \\[x, y, w, h\\]"),
    "unknown-image": (lambda r: _edit(r / "instances.json", lambda d: d["annotations"][1].__setitem__("image_id", 99)),
                      "instances.json: annotation 2 refers to unknown image_id 99"),
    "caption-not-object": (lambda r: _edit(r / "captions.json", lambda d: d["annotations"].append(5)),
                           "captions.json: a caption must be a JSON object, got 5"),
    "missing-image": (lambda r: (r / "images" / "2.jpg").unlink(),
                      "1 of 3 images listed in .*instances.json are missing .*first: 2.jpg.*--allow-missing-images"),
}


@pytest.mark.parametrize("case", list(DATAGEN_CASES))
def test_datagen_bad_annotations_fail_naming_file_and_culprit(tmp_path, capsys, case):
    from llavakit.cli import main

    root = make_coco(tmp_path)
    change, message = DATAGEN_CASES[case]
    change(root)
    scenes = ["--scenes", str(root / "scenes.jsonl")] if (root / "scenes.jsonl").exists() else []
    rc = main(["datagen", "captions", "--annotations", str(root), "--images-dir", str(root / "images"),
               "--out", str(tmp_path / "out.json"), *scenes])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out.json").exists()


def test_datagen_skips_and_counts_missing_images_and_keeps_the_others(tmp_path):
    from llavakit.datagen.captions import generate_captions
    from llavakit.datagen.config import CaptionsConfig, SourceConfig

    root = make_coco(tmp_path)
    (root / "images" / "2.jpg").unlink()
    _edit(root / "instances.json", lambda d: d["annotations"].append(
        {"id": "x7", "image_id": 3, "category_id": 1, "bbox": [0, 0, 5, 5]}))  # mixed id types still sort
    src = SourceConfig(annotations=root, images_dir=root / "images", allow_missing_images=True)
    report = generate_captions(CaptionsConfig(source=src, out=tmp_path / "caps.json"))
    data = json.loads((tmp_path / "caps.json").read_text())
    assert [r["image"] for r in data] == ["1.jpg", "3.jpg"]
    assert report.info["skipped_missing_images"] == ["2.jpg"]
    assert json.loads((tmp_path / "caps.report.json").read_text())["skipped_missing_images"] == ["2.jpg"]


@pytest.mark.parametrize("name, content, message", [
    ("latin1.json", '[{"id": "caf\u00e9", "conversations": []}]'.encode("latin-1"), r"latin1.json: not UTF-8 text"),
    ("torn.jsonl", b'{"id": 1, "conversations": [{"from": "human", "value": "x"}]}\n{"id": 2,\n', r"torn.jsonl:2: invalid JSON"),
    ("schema.json", b'[{"id": 1, "conversations": "hello"}]', r"schema.json: record 0 is not a LLaVA record"),
])
def test_datagen_mix_names_the_bad_source(tmp_path, name, content, message):
    from llavakit.datagen.config import DatagenError, MixConfig
    from llavakit.datagen.mix import mix_sources

    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": _turns(QUESTION)}]))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatagenError, match=message):
        mix_sources(MixConfig(sources=[str(good), str(tmp_path / name)], out=tmp_path / "mix.json"))
    assert not (tmp_path / "mix.json").exists()


# ---- chat -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from llavakit.infer.api import load_pipeline

    return load_pipeline(tiny_model_dir)


def answer(pipe, image, n: int = 6) -> str:
    return pipe.generate([([image], QUESTION)], max_new_tokens=n)[0]


@pytest.mark.parametrize("name", ["rgba", "16-bit", "cmyk", "palette-transparent"])
def test_chat_one_shot_uses_unusual_images(tiny_model_dir, pipe, files, capsys, name):
    from llavakit.cli import main

    rc = main(["chat", "--model", str(tiny_model_dir), "--image", str(files[name]), "What is this?",
               "--max-new-tokens", "6", "--threads", "1"])
    assert rc == 0 and capsys.readouterr().out == answer(pipe, load_image(files[name])) + "\n"


@pytest.mark.parametrize("name", ["truncated", "decompression-bomb", "text-as-png", "zero-byte"])
def test_chat_one_shot_bad_image_is_a_one_line_error(tiny_model_dir, files, capsys, name):
    from llavakit.cli import main

    rc = main(["chat", "--model", str(tiny_model_dir), "--image", str(files[name]), "What is this?"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"llavakit chat: error: {files[name]}: ") and BAD[name][2] in err


def test_python_api_converts_pil_images_of_any_mode_like_files(pipe, files):
    """A PIL image handed in directly gets the same RGB conversion as a file (not the processor's own)."""
    direct = {"rgba": _rgba(), "16-bit": Image.open(files["16-bit"]),
              "palette-transparent": Image.open(files["palette-transparent"])}
    for name, img in direct.items():
        assert img.mode in ("RGBA", "I;16", "P")
        from_file = load_image(files[name])
        assert pipe.pixel_values([img]).equal(pipe.pixel_values([from_file])), name
        assert answer(pipe, img) == answer(pipe, from_file)


def test_python_api_bad_prompts_name_the_culprit(pipe, files):
    from llavakit.infer.prompt import PromptError

    red = load_image(files["grayscale"])
    with pytest.raises(PromptError, match=r"item 1: the conversation has 2 <image> marker\(s\) but 1 image"):
        pipe.generate([([red], QUESTION), ([red], "<image><image> two?")])
    with pytest.raises(PromptError, match=r"item 0: .*0 <image> marker\(s\) but 1 image"):
        pipe.generate([([red], "No marker here.")])
    with pytest.raises(PromptError, match="item 0: the prompt is .* tokens .* context is 2048"):
        pipe.generate([([], "blue green red " * 1500)])
    with pytest.raises(PromptError, match="item 0: image 0 is a PosixPath, not a PIL image"):
        pipe.generate([([files["grayscale"]], QUESTION)])
    session = pipe.session()
    with pytest.raises(ValueError, match="reserved marker <image>"):
        session.ask("look: <image>")
    session.add_image(red)
    assert session.ask("What is this?", None)  # the session is still usable after the refusal


# ---- the server -------------------------------------------------------------------------------


def data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def body(*images: str, text: str = "What is this?", tokens: int = 4) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return {"model": "tiny", "max_tokens": tokens, "temperature": 0, "messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def client(tiny_model_dir, files):
    from fastapi.testclient import TestClient

    from llavakit.infer.api import load_pipeline
    from llavakit.serve.app import ServeConfig, create_app
    from llavakit.serve.images import ImageSources

    config = ServeConfig(max_batch_size=8, batch_wait_ms=20, images=ImageSources(local_dir=files["good-0"].parent))
    with TestClient(create_app(load_pipeline(tiny_model_dir, model_id="tiny"), config)) as c:
        yield c


def expect_answer(pipe, images: list, tokens: int = 4) -> str:
    return pipe.generate([(images, "<image>\n" * len(images) + "What is this?")], max_new_tokens=tokens)[0]


@pytest.mark.parametrize("name", list(BAD))
def test_server_bad_image_is_a_400_naming_the_field(client, name):
    good = data_url(UNUSUAL["grayscale"][0])
    r = client.post("/v1/chat/completions", json=body(good, data_url(BAD[name][0])))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith("messages[0].content[1].image_url (data URL): ") and BAD[name][2] in err["message"]
    assert err["code"] in ("invalid_image", "invalid_image_url")


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_server_unusual_images_are_answered(client, pipe, name):
    data, ext = UNUSUAL[name][:2]
    r = client.post("/v1/chat/completions", json=body(data_url(data, f"image/{ext}")))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expect_answer(pipe, [decode_image(data)])


@pytest.mark.parametrize("payload, status, needle", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}', 400, "request body is not valid JSON"),
    (b'{"model": "tiny", "messages": {"role": "user"}}', 400, "invalid request: messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": 7}]}', 400, "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
     "messages[0].content[0]: an image_url part needs 'image_url'"),
    (json.dumps(body(text="blue green red " * 1500)).encode(), 400, "context is 2048"),
    (json.dumps(body("nope.png")).encode(), 400, "messages[0].content[0].image_url: image file 'nope.png' not found"),
    (json.dumps(body("truncated.png")).encode(), 400, "messages[0].content[0].image_url (truncated.png): corrupt"),
    (json.dumps(body(text="two: <image>")).encode(), 400, "reserved token '<image>'"),
])
def test_server_bad_requests_name_the_field(client, payload, status, needle):
    r = client.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_server_bad_requests_do_not_disturb_good_ones_in_flight(client, pipe, files):
    """Good and bad requests at once: every good one is answered exactly as alone, every bad one is a 400."""
    goods = [load_image(files[f"good-{i}"]) for i in range(4)] + [load_image(files[n]) for n in ("rgba", "16-bit")]
    good_bodies = [body(data_url(encode(im)), tokens=6) for im in goods]
    bad_bodies = [body(data_url(BAD[n][0])) for n in BAD]
    before = client.get("/health").json()["requests"]
    jobs = [(b, True) for b in good_bodies] + [(b, False) for b in bad_bodies]
    order = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: client.post("/v1/chat/completions", json=job[0]), order))
    assert [r.status_code for r in replies] == [200 if ok else 400 for _, ok in order]
    answers = {json.dumps(b): r.json()["choices"][0]["message"]["content"] for r, (b, ok) in zip(replies, order) if ok}
    assert [answers[json.dumps(b)] for b in good_bodies] == [expect_answer(pipe, [im], 6) for im in goods]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["requests"] - before == len(good_bodies)

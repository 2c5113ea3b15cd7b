"""Stage 0 (`llavakit train clip`): a tiny real encoder run, its HF CLIP checkpoint, evaluation, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.train import clip_cli
from llavakit.train.clip import ClipConfigError, ClipTrainConfig, train_clip
from llavakit.train.clip_data import BOS, EOS, build_tokenizer, normalize, square_pixels
from llavakit.train.clip_eval import linear_probe, recall_at
from llavakit.world import WorldConfig, generate_world, load_scenes

ROOT = Path(__file__).resolve().parents[1]
# Few, well-separated colours on a plain white background: a tiny model can learn them in seconds.
TINY_WORLD = dict(min_size=64, max_size=80, colors=("red", "green", "blue", "black"), background_colors=("white",),
                  categories=("circle", "square", "triangle"), max_objects=3)  # fmt: skip
# One thread: a model this small gains nothing from two, and loses a lot when the CPU is shared.
TINY_MODEL = dict(image_size=32, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=4, text_hidden=64,
                  text_layers=2, text_heads=4, projection_dim=64, batch_size=16, max_steps=80, warmup_steps=20,
                  lr=2e-3, log_every=1, eval_every=40, val_images=30, probe_fit_images=120,
                  probe_test_images=80, threads=1, hard_batch_prob=0.0, category_loss_weight=0.0)  # fmt: skip
# hard batches (grouped by colour/shape) and the category loss are covered by their own tests below; the loss check
# above wants the CLIP loss alone on plain batches (on 64 images the category head overfits: val loss rises)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_worlds")
    generate_world(WorldConfig(out=root / "train", num_images=64, seed=3, split="train", **TINY_WORLD))
    generate_world(WorldConfig(out=root / "val", num_images=30, seed=3, split="val", **TINY_WORLD))
    return {"train": root / "train", "val": root / "val"}


@pytest.fixture(scope="module")
def tiny_run(worlds, tmp_path_factory):
    """One tiny-budget training run with evaluation (~10 s of one core)."""
    out = tmp_path_factory.mktemp("clip_run") / "enc"
    cfg = ClipTrainConfig(world=str(worlds["train"]), val_world=str(worlds["val"]), out=str(out), **TINY_MODEL)
    return train_clip(cfg, say=lambda msg: None)


def test_tiny_run_lowers_loss_and_probe_beats_chance(tiny_run):
    result = tiny_run
    assert len(result.losses) == 80
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    assert last < first - 0.4, (first, last)
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    colour = result.eval["probes"]["patch_mean"]["color"]
    assert colour["classes"] == 4 and colour["test"] == 80
    assert colour["acc"] > max(colour["chance"], colour["majority"]) + 0.25, colour
    assert set(result.eval["probes"]) == {"patch_mean", "patch_grid", "pooled"}
    assert set(result.eval["probes"]["patch_grid"]) == {"color", "shape", "count", "position"}
    r = result.eval["retrieval"]
    assert r["queries"] == 150 and 0.0 <= r["t2i_r1"] <= r["t2i_r5"] <= 1.0


def test_run_writes_logs_and_config(tiny_run):
    result = tiny_run
    out = result.out
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
                 "train_config.json", "metrics.jsonl", "loss.png", "eval.json"):  # fmt: skip
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 81))
    assert [x["step"] for x in lines if "val_loss" in x] == [40, 80]
    saved = json.loads((out / "train_config.json").read_text())
    assert ClipTrainConfig.from_dict(saved) == ClipTrainConfig(**{**saved, "betas": tuple(saved["betas"])})
    assert Image.open(out / "loss.png").size[0] > 100


def test_checkpoint_loads_as_hf_clip(tiny_run, worlds):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPTokenizer, CLIPVisionModel

    out = tiny_run.out
    model = CLIPModel.from_pretrained(out).eval()
    vision = CLIPVisionModel.from_pretrained(out).eval()
    proc = AutoImageProcessor.from_pretrained(out)
    tok = CLIPTokenizer.from_pretrained(out)
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "CLIPTokenizer"
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    assert proc.crop_size == {"height": 32, "width": 32}
    image = Image.new("RGB", (32, 32), (200, 20, 20))
    pixels = proc(image, return_tensors="pt")["pixel_values"]  # [1, 3, 32, 32]
    with torch.no_grad():
        a = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # [1, 17, 64]
        b = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        out_ = model(**tok(["A red square."], return_tensors="pt"), pixel_values=pixels)
    assert a.shape == (1, 17, 64) and torch.allclose(a, b)
    assert out_.logits_per_text.shape == (1, 1)


def test_tokenizer_is_clip_format(tiny_run, tmp_path):
    from transformers import CLIPTokenizer

    out = tiny_run.out
    vocab = json.loads((out / "vocab.json").read_text())
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab))) and vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    merges = (out / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and all(len(m.split(" ")) == 2 for m in merges[1:])
    # vocab.json + merges.txt alone (what OpenAI ships) load to the same tokenizer
    shutil.copy(out / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(out / "merges.txt", tmp_path / "merges.txt")
    full, bare = CLIPTokenizer.from_pretrained(out), CLIPTokenizer.from_pretrained(tmp_path)
    text = "Two RED circles; a Zebra café ✓ at the top left."
    assert full(text)["input_ids"] == bare(text)["input_ids"]
    toks = full.convert_ids_to_tokens(full(text)["input_ids"])
    assert toks[0] == BOS and toks[-1] == EOS and EOS not in toks[1:-1]  # no unknown pieces anywhere
    assert "two</w>" in toks and "red</w>" in toks
    assert full.decode(full(text)["input_ids"], skip_special_tokens=True).startswith("two red circles")


def test_build_tokenizer_truncates_to_budget(tmp_path):
    scenes = [{"captions": [f"A {c} {s} sits on the left." for c in ("red", "blue") for s in ("circle", "star")]}]
    tok = build_tokenizer(scenes, 530, tmp_path)
    assert len(tok) <= 530


def test_init_model_uses_the_encoder_as_vision_tower(tiny_run, tmp_path):
    from transformers import CLIPVisionModel

    from llavakit.model.build import InitConfig, init_model
    from llavakit.model.io import load_model
    from llavakit.model.tiny import tiny_llama

    enc = tiny_run.out
    lm = tiny_llama(tmp_path / "llama")
    out = init_model(InitConfig(vision=str(enc), lm=str(lm), out=str(tmp_path / "llava")))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_seq_length"] == 16 and cfg["vision_feature_layer"] == -2
    loaded = load_model(out)
    tower = loaded.model.model.vision_tower.state_dict()
    for key, value in CLIPVisionModel.from_pretrained(enc).state_dict().items():
        assert torch.equal(tower[key], value), key
    pixels = loaded.image_processor([Image.new("RGB", (60, 40), (20, 200, 20))], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 32, 32)


def test_pixels_match_llava_pad_processor(worlds, tmp_path):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    files = [worlds["train"] / s["file_name"] for s in load_scenes(worlds["train"])[:3]]
    for size in ((90, 50), (40, 70)):  # wide and tall: padded to a centred square, nothing cropped
        image = Image.new("RGB", size, (250, 250, 250))
        image.paste((220, 30, 30), (2, 2, 20, 20))
        image.save(tmp_path / f"{size[0]}x{size[1]}.png")
        files.append(tmp_path / f"{size[0]}x{size[1]}.png")
    llava = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for file in files:
        ours = normalize(torch.from_numpy(square_pixels(file, 32))[None])  # [1, 3, 32, 32]
        theirs = llava(Image.open(file).convert("RGB"), return_tensors="pt")["pixel_values"]  # [1, 3, 32, 32]
        assert (ours - theirs).abs().max().item() < 1e-5, file


def test_recall_and_probe_math():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.1, 0.2, 0.3], [0.5, 0.55, 0.6]])  # [Q=4, N=3]
    r = recall_at(sim, torch.tensor([0, 1, 2, 0]), (1, 2))
    assert r == {1: 0.5, 2: 0.75}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen)  # [N, D]
    y = [str(int(v)) for v in (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()]
    good = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert good["acc"] > 0.9 and good["classes"] == 4
    shuffled = [y[int(i)] for i in torch.randperm(300, generator=gen)]
    bad = linear_probe(x[:200], shuffled[:200], x[200:], shuffled[200:])
    assert bad["acc"] < 0.5


def test_eval_mode_prints_recall_and_writes_json(tiny_run, worlds, tmp_path, capsys):
    enc = tiny_run.out
    code = clip_cli.main(["--eval", "--model", str(enc), "--world", str(worlds["val"]), "--out", str(tmp_path),
                          "probe_fit_images=0", "val_images=20"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "R@1" in text and "R@5" in text
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["retrieval"]["images"] == 20 and report["image_tokens"] == 16
    assert clip_cli.main(["--eval", "--model", str(enc), "--world", str(worlds["val"]), "--out", str(tmp_path),
                          "--random-init", "probe_fit_images=0", "val_images=20"]) == 0  # fmt: skip
    assert (tmp_path / "eval_random_init.json").is_file()


def test_snapshots_are_loadable_clip_checkpoints_of_their_step(worlds, tmp_path, capsys, monkeypatch):
    """snapshot_every: snapshots/step-N every N steps (not at the end: that is the final model), each a full HF CLIP
    dir with the weights of step N that `--eval` reads."""
    from transformers import CLIPModel, CLIPTokenizer

    from llavakit.train.clip import _Trainer

    seen = {}  # step -> the live model's weights when its snapshot was taken
    real = _Trainer.snapshot

    def snapshot(self, step):
        seen[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        real(self, step)

    monkeypatch.setattr(_Trainer, "snapshot", snapshot)
    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "run"), compile=False,
                          **{**TINY_MODEL, "max_steps": 6, "batch_size": 8, "evaluate": False, "snapshot_every": 2})
    result = train_clip(cfg, say=lambda msg: None)
    snaps = result.out / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step-2", "step-4"] and sorted(seen) == [2, 4]
    for step in (2, 4):
        saved = CLIPModel.from_pretrained(snaps / f"step-{step}").state_dict()
        assert all(torch.equal(saved[k], seen[step][k]) for k in seen[step] if k in saved)
    name = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(seen[2][name], seen[4][name])  # the steps between changed the model
    assert CLIPTokenizer.from_pretrained(snaps / "step-4")("a red circle").input_ids[1:-1]
    assert clip_cli.main(["--eval", "--model", str(snaps / "step-4"), "--world", str(worlds["val"]), "--out",
                          str(tmp_path / "ev"), "probe_fit_images=0", "val_images=20"]) == 0  # fmt: skip
    assert "R@1" in capsys.readouterr().out
    with pytest.raises(ClipConfigError, match="snapshot_every"):
        ClipTrainConfig(world="w", out="o", snapshot_every=-1)


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_weights_of_an_unbroken_run(worlds, tmp_path, monkeypatch):
    """checkpoint_every: a run stopped mid-epoch after its checkpoint at step 10 and resumed ends with the weights,
    losses, validation losses, metrics lines and snapshots of a run that never stopped (hard batches and both
    auxiliary heads in play: every random-number state is restored); the checkpoint is gone at the end."""
    from safetensors.torch import load_file

    from llavakit.recipe.encoder import resumable
    from llavakit.train.clip import _Trainer

    settings = {**TINY_MODEL, "max_steps": 12, "batch_size": 8, "evaluate": False, "compile": False, "eval_every": 5,
                "checkpoint_every": 5, "snapshot_every": 11, "hard_batch_prob": 0.5, "category_loss_weight": 1.0}
    make = lambda name, **kw: ClipTrainConfig(world=str(worlds["train"]), val_world=str(worlds["val"]),  # noqa: E731
                                              out=str(tmp_path / name), **{**settings, **kw})
    whole = train_clip(make("whole"), say=lambda msg: None)
    assert not (whole.out / "checkpoint").exists()

    real = _Trainer.step

    def stop_at_12th_step(self, batch):  # 64 images / 8: the 12th step is mid-epoch 2, the checkpoint at 10 too
        if self.steps_done == 11:
            raise RuntimeError("killed")
        return real(self, batch)

    monkeypatch.setattr(_Trainer, "step", stop_at_12th_step)
    with pytest.raises(RuntimeError, match="killed"):
        train_clip(make("stopped"), say=lambda msg: None)
    monkeypatch.setattr(_Trainer, "step", real)
    out = tmp_path / "stopped"
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "snapshots" / "step-11").is_dir()
    said: list[str] = []
    assert resumable(type("R", (), {"say": said.append})(), out, make("stopped", threads=2)) is True
    assert resumable(type("R", (), {"say": said.append})(), out, make("stopped", lr=1e-3)) is False and "lr" in said[-1]
    with pytest.raises(ClipConfigError, match=r"other settings \(lr\)"):
        train_clip(make("stopped", lr=1e-3), say=lambda msg: None, resume=True)
    messages: list[str] = []
    resumed = train_clip(make("stopped", log_every=2), say=messages.append, resume=True)
    assert any(m.startswith("resuming") and m.endswith("at step 10/12") for m in messages), messages[:2]
    assert not (out / "checkpoint").exists()
    assert resumed.losses == whole.losses and resumed.val_losses == whole.val_losses == [(5, resumed.val_losses[0][1]),
                                                                                          (10, resumed.val_losses[1][1]),
                                                                                          (12, resumed.val_losses[2][1])]
    a, b = load_file(whole.out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    snap_a = load_file(whole.out / "snapshots" / "step-11" / "model.safetensors")
    snap_b = load_file(out / "snapshots" / "step-11" / "model.safetensors")
    assert all(torch.equal(snap_a[k], snap_b[k]) for k in snap_a)
    steps = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in  # noqa: E731
                         map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    logged = steps(out)
    assert [s for s in logged if s[0] <= 10] == steps(whole.out)[:len([s for s in logged if s[0] <= 10])]
    assert [s[0] for s in logged if s[0] > 10] == [12, 12]  # the stopped run's line of step 11 is gone; log_every 2


def test_resume_needs_a_checkpoint(worlds, tmp_path, capsys):
    code = clip_cli.main(["--world", str(worlds["train"]), "--out", str(tmp_path / "none"), "--resume"])
    assert code == 1 and "no checkpoint to resume from" in capsys.readouterr().err
    assert clip_cli.main(["--eval", "--resume", "--model", "m", "--world", str(worlds["val"])]) == 1
    assert "--resume goes with training" in capsys.readouterr().err
    with pytest.raises(ClipConfigError, match="checkpoint_every"):
        ClipTrainConfig(world="w", out="o", checkpoint_every=-1)


def test_missing_world_is_a_clear_error(tmp_path, capsys):
    code = clip_cli.main(["--world", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 1
    assert f"world directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"nope does not exist"):
        train_clip(ClipTrainConfig(world=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["lerning_rate=0.1"], "unknown config key(s) lerning_rate"),
        (["image_size=100"], "multiple of patch_size"),
        (["vision_heads=5"], "must divide vision_hidden"),
        (["batch_size=0"], "batch_size must be a positive integer"),
        (["lr=-1"], "lr must be a positive number"),
        (["epochs"], "not KEY=VALUE"),
        (["patch_init=zca"], "patch_init must be one of random, pca, luma"),
        (["patch_init=luma", "patch_size=4", "image_size=112"], "patch_init luma makes 2/3 of vision_hidden (128 of 192) "
         "outline filters, and at most patch_size**2 - 1 (15) fit: lower vision_hidden or raise patch_size"),
        (["category_loss_weight=-1"], "category_loss_weight must be >= 0"),
        (["patch_init=pca", "patch_size=4", "image_size=112"], "patch_init pca needs vision_hidden"),
    ],
)
def test_bad_config_names_the_culprit(worlds, tmp_path, capsys, overrides, culprit):
    code = clip_cli.main(["--world", str(worlds["train"]), "--out", str(tmp_path / "o"), *overrides])
    assert code == 1
    assert culprit in capsys.readouterr().err


def test_config_errors_and_nonempty_out(worlds, tmp_path):
    with pytest.raises(ClipConfigError, match="world is required"):
        ClipTrainConfig(out="x")
    with pytest.raises(ClipConfigError, match="larger than the training world"):
        train_clip(ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "big"), batch_size=512))
    assert not (tmp_path / "big").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        train_clip(ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "full"), batch_size=16))


def test_recipe_file_is_the_default_config():
    args = clip_cli.build_parser().parse_args(
        ["--config", str(ROOT / "configs" / "clip-world.yaml"), "--world", "w", "--val-world", "v", "--out", "o"]
    )
    cfg = clip_cli.train_config(args)
    assert cfg == ClipTrainConfig(world="w", val_world="v", out="o")  # the dataclass defaults are the recipe


def test_training_with_hard_batches_runs(worlds, tmp_path):
    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "hard"),
                          **{**TINY_MODEL, "max_steps": 6, "hard_batch_prob": 1.0, "batch_size": 8, "evaluate": False})
    result = train_clip(cfg, say=lambda msg: None)
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
    assert json.loads((result.out / "train_config.json").read_text())["hard_batch_prob"] == 1.0
    with pytest.raises(ClipConfigError, match="hard_batch_prob"):
        ClipTrainConfig(world="w", out="o", hard_batch_prob=1.5)


def test_pca_patch_init_whitens_the_training_patches(worlds, tmp_path):
    """patch_init pca: channels uncorrelated with variance gain**2 on training patches; the run trains and records it."""
    from llavakit.train.clip_data import load_world_images
    from llavakit.train.clip_init import patch_pca_

    pixels, _ = load_world_images(worlds["train"], 32)  # [N, 3, 32, 32]
    conv = torch.nn.Conv2d(3, 48, 8, 8, bias=False)
    vals = patch_pca_(conv, pixels, samples=100_000)
    assert torch.all(vals[:-1] >= vals[1:])  # descending eigenvalues
    out = conv(normalize(pixels)).permute(0, 2, 3, 1).reshape(-1, 48).double()  # [N*16, 48], every patch
    cov = torch.cov(out.T)  # [48, 48]
    assert torch.allclose(cov.diagonal()[:24], torch.full((24,), 0.25, dtype=torch.double), rtol=0.05)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.02
    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "pca"),
                          **{**TINY_MODEL, "max_steps": 4, "batch_size": 8, "evaluate": False, "patch_init": "pca"})
    result = train_clip(cfg, say=lambda msg: None)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert json.loads((result.out / "train_config.json").read_text())["patch_init"] == "pca"


def test_luma_patch_init_gives_colour_blind_outline_filters(worlds, tmp_path):
    """patch_init luma: on its outputs a flat patch of any colour gives 0, and one outline in two colour pairs gives
    the same direction (up to sign and scale); the other outputs keep their init; the run trains and records it."""
    from llavakit.train.clip_data import load_world_images
    from llavakit.train.clip_init import patch_luma_

    pixels, _ = load_world_images(worlds["train"], 32)  # [N, 3, 32, 32]
    conv = torch.nn.Conv2d(3, 48, 8, 8, bias=False)
    before = conv.weight[32:].clone()
    patch_luma_(conv, pixels, dims=32)
    assert torch.equal(conv.weight[32:], before)
    mask = torch.zeros(8, 8)
    mask[2:6, 1:7] = 1.0  # an outline inside the patch

    def code(fg, bg):  # [32] luma outputs for colour fg drawn over bg
        patch = torch.tensor(bg)[:, None, None] + (torch.tensor(fg) - torch.tensor(bg))[:, None, None] * mask
        return conv(normalize((patch * 255).round().to(torch.uint8)[None]))[0, :32, 0, 0]

    flat = conv(normalize(torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)))[:, :32]  # [2, 32, 1, 1]
    assert flat.abs().max() < 1e-4
    a, b = code([1.0, 0.1, 0.1], [0.9, 0.9, 0.9]), code([0.1, 0.8, 0.2], [0.1, 0.1, 0.1])  # darker / brighter object
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() < -0.999 and min(a.norm(), b.norm()) > 0.1
    # the limit, why a third of the outputs stay random: pairs with (nearly) equal channel sums (this red on blue)
    assert code([1.0, 0.1, 0.1], [0.1, 0.2, 0.9]).norm() < 0.1 * a.norm()
    with pytest.raises(ValueError, match="luma dims"):
        patch_luma_(conv, pixels, dims=64)
    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "luma"),
                          **{**TINY_MODEL, "max_steps": 4, "batch_size": 8, "evaluate": False, "patch_init": "luma"})
    result = train_clip(cfg, say=lambda msg: None)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert json.loads((result.out / "train_config.json").read_text())["patch_init"] == "luma"


def test_category_loss_trains_a_head_beside_the_clip_loss(worlds, tmp_path):
    """category_loss_weight > 0: the multi-label category loss is logged and falls; the checkpoint is plain CLIP."""
    from transformers import CLIPModel

    from llavakit.train.clip import CategoryHead

    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "cat"),
                          **{**TINY_MODEL, "max_steps": 40, "evaluate": False, "category_loss_weight": 1.0})
    result = train_clip(cfg, say=lambda msg: None)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    category = [r["category_loss"] for r in records if "category_loss" in r]
    assert len(category) == 40 and np.mean(category[-10:]) < np.mean(category[:10]) - 0.05, category
    assert all(np.isfinite(result.losses))
    model = CLIPModel.from_pretrained(result.out)  # no extra weights in the checkpoint
    assert model.vision_model.config.hidden_size == TINY_MODEL["vision_hidden"]
    scenes = load_scenes(worlds["train"])
    head = CategoryHead.build(cfg, scenes, 8)
    assert head.names == ["circle", "square", "triangle"]
    first = {o["category"] for o in scenes[0]["objects"]}
    assert [n for n, v in zip(head.names, head.targets[0].tolist()) if v] == sorted(first)
    one = [{**sc, "objects": [o for o in sc["objects"] if o["category"] == "circle"]} for sc in scenes]
    with pytest.raises(ClipConfigError, match="at least two object categories"):
        CategoryHead.build(cfg, one, 8)


def test_box_patch_mask_maps_a_box_through_the_pad_view():
    """A box of a 64 x 32 image (padded to 64 x 64: 16 px at the top) on an 8 x 8 grid of 4 px patches at 32 px."""
    from llavakit.train.clip_objects import box_patch_mask

    mask = box_patch_mask([0, 0, 32, 16], 64, 32, image_size=32, patch_size=4).view(8, 8)
    # tower pixels: x 0..16, y (0 + 16) / 2 = 8..16 -> patch centres 2, 6, 10, 14 across; 10, 14 down
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 0:4] = True
    assert torch.equal(mask, expected)
    tiny = box_patch_mask([30, 30, 1, 1], 64, 64, image_size=32, patch_size=4).view(8, 8)  # no centre inside
    assert tiny.sum() == 1 and tiny[3, 3]


def test_object_loss_names_each_objects_shape_and_colour_from_its_patches(worlds, tmp_path):
    """object_loss_weight > 0: targets follow the scene graph, the loss is logged and falls, the checkpoint is plain CLIP."""
    from transformers import CLIPModel

    from llavakit.train.clip_objects import object_targets

    scenes = load_scenes(worlds["train"])
    targets = object_targets(scenes, image_size=32, patch_size=8)
    assert targets.category_names == ["circle", "square", "triangle"]
    for row in (0, 1):
        objs = scenes[row]["objects"]
        names = [targets.category_names[i] for i in targets.categories[row].tolist() if i != -100]
        colors = [targets.color_names[i] for i in targets.colors[row].tolist() if i != -100]
        assert names == [o["category"] for o in objs] and colors == [o["color"] for o in objs]
        assert (targets.masks[row, : len(objs)].sum(-1) >= 1).all() and targets.masks[row, len(objs) :].sum() == 0
    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "obj"),
                          **{**TINY_MODEL, "max_steps": 40, "evaluate": False, "object_loss_weight": 1.0})
    result = train_clip(cfg, say=lambda msg: None)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["object_loss"] for r in records if "object_loss" in r]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3, losses
    assert "category_loss" not in records[-1]
    model = CLIPModel.from_pretrained(result.out)  # the heads are not saved
    assert not any("object" in k or "category" in k for k in model.state_dict())
    with pytest.raises(ClipConfigError, match="object_loss_weight must be >= 0"):
        ClipTrainConfig(world="w", out="o", object_loss_weight=-0.5)


def test_position_loss_names_each_objects_cell_from_its_patches(worlds, tmp_path):
    """position_loss_weight > 0: each object's 3x3 cell from the scene graph is the target, the loss is logged and
    falls, the head is not saved; and a checkpoint of the run knows the head (resume needs it)."""
    from transformers import CLIPModel

    from llavakit.train.clip_objects import object_targets
    from llavakit.world.config import POSITIONS

    scenes = load_scenes(worlds["train"])
    targets = object_targets(scenes, image_size=32, patch_size=8)
    for row in (0, 1, 2):
        objs = scenes[row]["objects"]
        cells = [POSITIONS[i] for i in targets.positions[row].tolist() if i != -100]
        assert cells == [o["position"] for o in objs] and len(set(POSITIONS)) == 9
    cfg = ClipTrainConfig(world=str(worlds["train"]), out=str(tmp_path / "pos"),
                          **{**TINY_MODEL, "max_steps": 40, "evaluate": False, "position_loss_weight": 1.0,
                             "object_loss_weight": 0.0})
    result = train_clip(cfg, say=lambda msg: None)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["position_loss"] for r in records if "position_loss" in r]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2, losses
    assert "object_loss" not in records[-1]
    model = CLIPModel.from_pretrained(result.out)
    assert not any("position" in k and "embedding" not in k for k in model.state_dict())
    with pytest.raises(ClipConfigError, match="position_loss_weight must be >= 0"):
        ClipTrainConfig(world="w", out="o", position_loss_weight=float("nan"))
    from llavakit.train.clip import aux_heads

    unplaced = [{**s, "objects": [{k: v for k, v in o.items() if k != "position"} for o in s["objects"]]} for s in scenes]
    with pytest.raises(ClipConfigError, match="this world records none"):
        aux_heads(cfg, unplaced, 64)
    odd = [{**scenes[0], "objects": [{**scenes[0]["objects"][0], "position": "upstairs"}]}]
    with pytest.raises(ValueError, match="object 0: position 'upstairs' is not one of top left"):
        object_targets(odd, image_size=32, patch_size=8)


def test_hard_batches_share_one_value_and_name_the_object():
    """Grouped batches: every image holds the shared colour/shape, each caption names that object, none repeats."""
    import random

    import torch

    from llavakit.train.clip_hard import HardBatchSampler, focus_caption, focus_objects

    rng = random.Random(0)
    colors, shapes = ("red", "green", "blue"), ("circle", "star", "square", "triangle")
    cells = ("top left", "top", "center", "bottom right", "left")
    scenes = [{"objects": [{"color": rng.choice(colors), "category": rng.choice(shapes), "supercategory": "shape",
                            "position": rng.choice(cells)} for _ in range(rng.randint(1, 3))]} for _ in range(200)]

    class WordTokenizer:  # one id per word: enough to read the captions back
        vocab: dict[str, int] = {}

        def __call__(self, texts, **kw):
            ids = [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()] for t in texts]
            ids = [x[: kw["max_length"]] + [0] * (kw["max_length"] - len(x)) for x in ids]
            return {"input_ids": torch.tensor(ids)}

    tok = WordTokenizer()
    objects = focus_objects(scenes, tok, length=9)
    assert objects.input_ids.shape == (sum(len(s["objects"]) for s in scenes), 9)
    assert focus_caption(scenes[0]["objects"][0]).split()[1] == scenes[0]["objects"][0]["color"]
    sampler = HardBatchSampler(objects, batch_size=12, generator=torch.Generator().manual_seed(0))
    words = {v: k for k, v in tok.vocab.items()}
    kinds = set()
    for _ in range(30):
        images, ids = sampler.draw()
        assert len(set(images.tolist())) == 12
        captions = [" ".join(words[i] for i in row.tolist() if i) for row in ids]
        assert len(set(captions)) == 12
        colours = {c.split()[1] for c in captions}
        nouns = {c.split()[2] for c in captions}
        assert len(colours) == 1 or len(nouns) == 1, captions
        kinds.add("color" if len(colours) == 1 else "category")
        for image, caption in zip(images.tolist(), captions):
            assert caption in {focus_caption(o) for o in scenes[image]["objects"]}
    assert kinds == {"color", "category"}
    with pytest.raises(ValueError, match="too small for hard batches"):
        HardBatchSampler(objects, batch_size=150, generator=torch.Generator())


def test_probes_read_a_llava_models_tower_like_its_clip_checkpoint(tiny_run, worlds, tiny_parts, tmp_path):
    """`--eval --model LLAVA_DIR` probes the tower inside a LLaVA model: one built from the tiny encoder
    gives exactly the encoder's own patch-feature probe scores, and no retrieval."""
    from llavakit.model.build import InitConfig, init_model
    from llavakit.train.clip_eval import EvalConfig, evaluate

    result = tiny_run
    llava = init_model(InitConfig(vision=str(result.out), lm=str(tiny_parts["llama"]), out=str(tmp_path / "llava")))
    cfg = EvalConfig(model=str(llava), world=str(worlds["val"]), out=str(tmp_path / "eval"), val_images=30,
                     probe_fit_images=120, probe_test_images=80, threads=1)
    report = evaluate(llava, cfg, say=lambda msg: None)
    assert report["retrieval"] is None and report["params"]["vision"] > 0
    for feature in ("patch_mean", "patch_grid"):
        for attr in ("color", "shape", "count", "position"):
            assert report["probes"][feature][attr]["acc"] == result.eval["probes"][feature][attr]["acc"], (feature, attr)
    assert (tmp_path / "eval" / "eval.json").is_file()
    with pytest.raises(ValueError, match="LLaVA model dir"):
        evaluate(llava, EvalConfig(model=str(llava), world=str(worlds["val"]), random_init=True), say=lambda m: None)

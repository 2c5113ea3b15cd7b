"""Two-stage training on tiny models: what each stage trains, LoRA, loss masking, resume, feature
cache, bad data, dry runs of the 7B recipes, and init -> align -> instruct end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from llavakit.cli import main
from llavakit.model.io import load_model
from llavakit.train.config import ConfigError, TrainConfig
from llavakit.train.synthetic import write_dataset
from llavakit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    caption, images = write_dataset(root, 40, "caption")
    qa, _ = write_dataset(root, 40, "qa", text_only=4, multi_image=4)
    return {"caption": caption, "qa": qa, "images": images}


def config(stage, init, out, records, images, **sections) -> TrainConfig:
    base = {
        "stage": stage, "init_from": str(init), "out": str(out),
        "data": {"path": str(records), "image_folder": str(images), "num_workers": 0, "eval_size": 8},
        "optim": {"batch_size": 8, "micro_batch_size": 4, "epochs": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(base)


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model(path).model.state_dict().items()}


def report(out) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


@pytest.fixture(scope="module")
def aligned(tiny_model_dir, squares, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "run"
    cfg = config("align", tiny_model_dir, out, squares["caption"], squares["images"],
                 log={"tensorboard": True, "plot": True}, checkpoint={"every_steps": 2, "keep_last": 2})
    return train(cfg)


def test_align_trains_only_the_projector(aligned, tiny_model_dir, squares):
    before, after = weights(tiny_model_dir), weights(aligned / "model")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "multi_modal_projector" in k}  # everything else bit-identical
    assert_transformers_logits_match(aligned / "model", squares)
    lm = load_model(aligned / "model")
    assert lm.meta.stage == "align" and lm.template.name == "vicuna_v1"  # the chat template is kept for stage 2
    entry = lm.meta.history[-1]
    assert entry["stage"] == "align" and entry["template"] == "plain" and entry["config"]["optim"]["lr"] == 1e-3


def assert_transformers_logits_match(model_dir: Path, squares) -> None:
    """transformers' LlavaForConditionalGeneration loads a trained dir with no key problems and, given an image,
    computes llavakit's logits."""
    from transformers import LlavaForConditionalGeneration

    hf, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    lm = load_model(model_dir)
    rec = json.loads(squares["qa"].read_text())[0]
    image = Image.open(squares["images"] / rec["image"]).convert("RGB")
    pixels = lm.image_processor([image], return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
    ids = torch.tensor([[1] + [lm.model.config.image_token_id] * lm.image_seq_length + [5, 9, 30]])  # [1, T]
    with torch.no_grad():
        ours = lm.model(input_ids=ids, pixel_values=pixels).logits  # [1, T, V]
        theirs = hf.eval()(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_align_writes_every_output(aligned):
    names = {p.name for p in aligned.iterdir()}
    assert {"model", "checkpoints", "metrics.jsonl", "tb", "loss.png", "config.yaml", "report.json"} <= names
    assert [p.name for p in sorted((aligned / "checkpoints").iterdir())] == ["step-2", "step-4"]  # keep_last 2 of 2, 4
    assert (aligned / "checkpoints" / "step-4" / "config.yaml").read_text() == (aligned / "config.yaml").read_text()
    assert any((aligned / "tb").iterdir()) and Image.open(aligned / "loss.png").size[0] > 300
    r = report(aligned)
    assert r["steps"] == 4 and r["records"] == {"train": 32, "eval": 8, "dropped_incomplete_batch_per_epoch": 0}
    assert 0 <= r["padding_fraction_per_epoch"][0]["padding_fraction"] < 0.5 and r["skipped"]["count"] == 0
    kinds = [m["kind"] for m in map(json.loads, (aligned / "metrics.jsonl").read_text().splitlines())]
    assert kinds.count("train") == 4 and kinds.count("eval") == 2 and kinds.count("epoch") == 1
    first = json.loads((aligned / "metrics.jsonl").read_text().splitlines()[1])
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "padding_fraction"} <= first.keys()


def test_eval_measures_how_much_the_images_matter(aligned, tiny_model_dir, squares, tmp_path):
    """image_gain = held-out loss with other records' images - with the right ones: logged at every eval,
    exactly 0 when the projector maps every image to the same tokens, and absent when turned off."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llavakit.train.trainer import _swap_images

    rows = [m for m in map(json.loads, (aligned / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "eval"]
    assert all(isinstance(r["image_gain"], float) and r["image_gain"] != 0.0 for r in rows)
    blind = tmp_path / "blind"
    shutil.copytree(tiny_model_dir, blind)
    tensors = load_file(blind / "model.safetensors")
    for k in [k for k in tensors if "multi_modal_projector.linear_2" in k]:
        tensors[k] = torch.zeros_like(tensors[k])  # every image -> the same (zero) tokens
    save_file(tensors, blind / "model.safetensors", metadata={"format": "pt"})
    runs = {}
    for name, on in (("zeroed", True), ("off", False)):
        out = train(config("align", blind, tmp_path / name, squares["caption"], squares["images"],
                           optim={"max_steps": 1}, eval={"at_start": True, "image_gain": on}))
        runs[name] = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "eval"]
    assert runs["zeroed"][0]["step"] == 0 and abs(runs["zeroed"][0]["image_gain"]) < 1e-9
    assert all("image_gain" not in r for r in runs["off"])
    pixels = torch.arange(3.0).view(3, 1)  # [N, ...]
    assert _swap_images({"pixel_values": pixels})["pixel_values"].flatten().tolist() == [2.0, 0.0, 1.0]
    assert _swap_images({"pixel_values": pixels[:1]}) is None and _swap_images({"input_ids": pixels}) is None


def test_instruct_full_trains_language_model_and_projector(aligned, squares, tmp_path):
    out = train(config("instruct", aligned, tmp_path / "full", squares["qa"], squares["images"], optim={"lr": 1e-3}))
    before, after = weights(aligned / "model"), weights(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any("vision_tower" in k for k in changed)  # frozen unless train_vision
    assert any("multi_modal_projector" in k for k in changed) and any("language_model.layers" in k for k in changed)
    assert "model.language_model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert_transformers_logits_match(out / "model", squares)
    meta = load_model(out / "model").meta
    assert meta.stage == "instruct" and [h["stage"] for h in meta.history] == ["align", "instruct"]


def test_instruct_lora_merges_into_a_transformers_model(aligned, squares, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    cfg = config("instruct", aligned, tmp_path / "lora", squares["qa"], squares["images"],
                 optim={"lr": 1e-2, "projector_lr": 1e-3}, lora={"enabled": True, "r": 4, "alpha": 8, "save_adapter": True})
    out = train(cfg)
    hf, info = LlavaForConditionalGeneration.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.tensor([[1, 5, 9, 30, 31, 2]])
    base = load_model(aligned / "model").model
    with torch.no_grad():
        merged = hf.eval()(input_ids=ids).logits  # [1, T, V]
        untrained = base(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(base, out / "adapter").eval()  # base + adapter == merged
        assert (adapter(input_ids=ids).logits - merged).abs().max() < 1e-4
    assert (untrained - merged).abs().max() > 1e-3  # and training changed the model
    train_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert train_rows[0]["lr"] / train_rows[0]["projector_lr"] == pytest.approx(10.0)  # own projector LR
    before, after = weights(aligned / "model"), weights(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_targets = {k for k in before if k.startswith("model.language_model.layers.") and k.endswith("proj.weight")}
    # the projector and the merged LoRA linears, nothing else (tower, embeddings, norms, lm_head bit-identical)
    assert changed == lora_targets | {k for k in before if "multi_modal_projector" in k}
    assert_transformers_logits_match(out / "model", squares)


@pytest.mark.parametrize("lm_name", ["llama", "qwen2"])  # qwen2: tied embeddings (one set of rows)
def test_lora_trains_the_rows_of_tokens_the_template_added(tiny_parts, squares, tmp_path, lm_name):
    """chatml's <|im_start|>/<|im_end|> are new to the tiny LMs: init sets their embedding and LM-head rows to the
    mean row (as LLaVA), and a LoRA run trains exactly those rows (peft trainable tokens, a small adapter)."""
    from conftest import make_model
    from peft import PeftModel
    from safetensors.torch import load_file

    from llavakit.train.model import new_token_ids

    start = make_model(tiny_parts, tmp_path / "m", lm=lm_name, template="chatml")
    lm = load_model(start)
    new = new_token_ids(lm.tokenizer, lm.model.config)
    assert lm.tokenizer.convert_ids_to_tokens(new) == ["<|im_start|>", "<|im_end|>"]
    old = lm.model.config.image_token_id  # `<image>` comes first: the rows before it are the base LM's
    assert lm.meta.added_token_ids[0] == old and set(new) <= set(lm.meta.added_token_ids)  # recorded at init
    legacy = copy.deepcopy(lm.model.config)
    legacy.llavakit = {k: v for k, v in legacy.llavakit.items() if k != "added_token_ids"}
    assert new_token_ids(lm.tokenizer, legacy) == new  # a dir from before the record: the same by the old rule
    for layer in (lm.model.get_input_embeddings(), lm.model.get_output_embeddings()):
        mean = layer.weight[:old].mean(0)  # [D]
        assert all(torch.allclose(layer.weight[i], mean, atol=1e-6) for i in [old, *new])
    out = train(config("instruct", start, tmp_path / "run", squares["qa"], squares["images"],
                       optim={"lr": 1e-2, "max_steps": 2}, lora={"enabled": True, "r": 4, "alpha": 8, "save_adapter": True}))
    before, after = weights(start), weights(out / "model")
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        moved = (before[key] != after[key]).any(dim=1)  # [V]
        assert moved.nonzero().flatten().tolist() == new, key  # those rows, and no other
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    rows = {k: tuple(v.shape) for k, v in adapter.items() if "trainable_tokens" in k}
    assert set(rows.values()) == {(2, 64)} and len(rows) == (1 if lm_name == "qwen2" else 2)
    assert max(v.shape[0] for v in adapter.values()) < len(lm.tokenizer)  # no whole [V, D] matrix saved
    ids = torch.tensor([[1, new[0], 5, 9, new[1], 2]])
    with torch.no_grad():
        merged = load_model(out / "model").model(input_ids=ids).logits  # [1, T, V]
        rebuilt = PeftModel.from_pretrained(load_model(start).model, out / "adapter").eval()(input_ids=ids).logits
    assert (rebuilt - merged).abs().max() < 1e-4
    assert_transformers_logits_match(out / "model", squares)


@pytest.fixture(scope="module")
def chatml_model(tiny_parts, tmp_path_factory):
    """A tiny CLIP + Llama model with the chatml template: init added <|im_start|>/<|im_end|> (LoRA trains their rows)."""
    from conftest import make_model

    return make_model(tiny_parts, tmp_path_factory.mktemp("chatml") / "m", template="chatml")


def test_lora_train_new_tokens_false_goes_on_training_an_adapter_from_before_token_rows(chatml_model, squares, tmp_path):
    """An adapter saved before LoRA trained added-token rows has none: continuing it is refused naming the likely
    cause and the setting; with lora.train_new_tokens: false it goes on, and no token row is trained."""
    from peft import PeftConfig

    from llavakit.train.config import LoraConfig
    from llavakit.train.model import apply_lora

    lora = {"enabled": True, "r": 4, "alpha": 8, "save_adapter": True}
    apply_lora(load_model(chatml_model).model, LoraConfig(**lora), train_vision=False).save_pretrained(tmp_path / "old")
    assert PeftConfig.from_pretrained(str(tmp_path / "old")).trainable_token_indices is None  # what llavakit saved then
    with pytest.raises(ValueError, match=r"trainable_token_indices: None there, \{'embed_tokens': .* here \(an adapter "
                       r"without token rows is likely from an llavakit version before .*`lora.train_new_tokens: false`"):
        train(config("instruct", chatml_model, tmp_path / "refused", squares["qa"], squares["images"],
                     optim={"max_steps": 1}, lora={**lora, "init_adapter": str(tmp_path / "old")}))
    out = train(config("instruct", chatml_model, tmp_path / "run", squares["qa"], squares["images"],
                       optim={"lr": 1e-2, "max_steps": 2},  # step 1 is the warmup's, at lr 0
                       lora={**lora, "init_adapter": str(tmp_path / "old"), "train_new_tokens": False}))
    assert PeftConfig.from_pretrained(str(out / "adapter")).trainable_token_indices is None
    before, after = weights(chatml_model), weights(out / "model")
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # no row trained: the old behaviour
    assert not torch.equal(before["model.multi_modal_projector.linear_1.weight"],
                           after["model.multi_modal_projector.linear_1.weight"])


def test_resuming_a_run_from_before_token_rows_names_the_cause(chatml_model, squares, tmp_path):
    """A LoRA run checkpointed before added-token rows were trained (no lora.train_new_tokens in its config.yaml,
    no token rows in its checkpoint): --resume says so and names the setting, which then resumes it."""
    lora = {"enabled": True, "r": 4, "alpha": 8}
    cfg = config("instruct", chatml_model, tmp_path / "run", squares["qa"], squares["images"],
                 optim={"max_steps": 1}, checkpoint={"every_steps": 1}, eval={"at_start": False},
                 lora={**lora, "train_new_tokens": False})
    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["lora"]["train_new_tokens"]  # as written by llavakit before the setting existed
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    now = {**cfg.to_dict(), "lora": lora}
    with pytest.raises(ValueError, match=r"missing \[.*trainable_tokens_delta.*only the rows of the tokens `llavakit "
                       r"init` added are missing: .*before LoRA trained those rows; resume it with "
                       r"`lora.train_new_tokens: false`"):
        train(TrainConfig.from_dict(now), resume=True)
    resumed = train(TrainConfig.from_dict({**now, "lora": {**lora, "train_new_tokens": False}}), resume=True)
    assert report(resumed)["resumed_from_step"] == 1


def test_lora_token_rows_are_refused_under_zero3(chatml_model, tiny_model_dir, squares, tmp_path, monkeypatch, capsys):
    """peft's trainable tokens break under ZeRO-3 (peft #2946): a LoRA run with added-token rows to train is refused
    at start, before DeepSpeed is needed, and by the dry run's check; ZeRO-2, or no token rows, is let through."""
    from llavakit.train.dryrun import Checks, check_token_rows
    from llavakit.train.setup import check_token_rows_sharding, zero_stage

    zero = {n: str(REPO / f"configs/deepspeed/zero{n}.json") for n in (2, 3)}
    lora = {"enabled": True, "r": 4, "alpha": 8}
    want = (r"lora.train_new_tokens: .*rows of 2 token\(s\).*ZeRO-3.*peft issue #2946.*ZeRO-2.*"
            r"lora.train_new_tokens: false")
    cfg = config("instruct", chatml_model, tmp_path / "run", squares["qa"], squares["images"], lora=lora,
                 runtime={"deepspeed": zero[3]})
    with pytest.raises(ConfigError, match=want):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    checks = Checks()
    check_token_rows(cfg, checks)
    assert checks.failed == 1 and "ZeRO-3" in capsys.readouterr().out
    for fine in ({"lora": {**lora, "train_new_tokens": False}}, {"runtime": {"deepspeed": zero[2]}},
                 {"init_from": str(tiny_model_dir)}):  # vicuna_v1 adds no token LoRA would train
        checks = Checks()
        check_token_rows(TrainConfig.from_dict({**cfg.to_dict(), **fine}), checks)
        assert checks.failed == 0, fine
    check_token_rows_sharding([], 3)
    base = TrainConfig.from_dict({**cfg.to_dict(), "runtime": {}})
    assert zero_stage(base) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero_stage(base) == 3
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", zero[2])
    assert zero_stage(base) == 2


def test_lora_init_adapter_goes_on_training_a_saved_adapter(aligned, squares, tmp_path):
    """A second LoRA run from the same base continues the first run's adapter (its step-0 eval loss is the
    first run's final one, not the base model's), and its adapter alone still rebuilds its merged model."""
    from peft import PeftModel

    lora = {"enabled": True, "r": 4, "alpha": 8, "save_adapter": True}
    first = train(config("instruct", aligned, tmp_path / "first", squares["qa"], squares["images"],
                         optim={"lr": 1e-2, "max_steps": 3}, lora=lora))
    runs = {}
    for name, init in (("fresh", None), ("continued", str(first))):  # the run dir: its adapter/ is used
        out = train(config("instruct", aligned, tmp_path / name, squares["qa"], squares["images"],
                           optim={"lr": 1e-2, "max_steps": 1}, eval={"at_start": True},
                           lora={**lora, "init_adapter": init}))
        runs[name] = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x)
        assert runs[name]["step"] == 0
    assert runs["continued"]["eval_loss"] == pytest.approx(report(first)["eval_loss"], abs=1e-5)
    assert abs(runs["fresh"]["eval_loss"] - report(first)["eval_loss"]) > 1e-3
    ids = torch.tensor([[1, 5, 9, 30, 31, 2]])
    with torch.no_grad():
        merged = load_model(tmp_path / "continued" / "model").model.eval()(input_ids=ids).logits  # [1, T, V]
        base = load_model(aligned / "model").model
        rebuilt = PeftModel.from_pretrained(base, tmp_path / "continued" / "adapter").eval()(input_ids=ids).logits
    assert (rebuilt - merged).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"init_adapter .*first/adapter.*r: 4 there, 8 here"):
        train(config("instruct", aligned, tmp_path / "wrong", squares["qa"], squares["images"],
                     optim={"max_steps": 1}, lora={**lora, "r": 8, "alpha": 16, "init_adapter": str(first)}))
    with pytest.raises(ConfigError, match="lora.init_adapter: needs lora.enabled"):
        config("instruct", aligned, tmp_path / "x", squares["qa"], squares["images"], lora={"init_adapter": str(first)})


def test_lora_init_adapter_reads_an_adapter_whose_targets_peft_saved_compressed(tiny_parts, tmp_path):
    """With 20+ target layers peft saves target_modules as a short pattern: the wrapped layers are compared."""
    from conftest import make_model
    from peft import PeftConfig

    from llavakit.model.tiny import tiny_llama
    from llavakit.train.config import LoraConfig
    from llavakit.train.model import apply_lora

    model_dir = make_model({**tiny_parts, "llama": tiny_llama(tmp_path / "lm3", layers=3)}, tmp_path / "m")  # 21 linears
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    apply_lora(load_model(model_dir).model, lora, train_vision=False).save_pretrained(tmp_path / "adapter")
    saved = PeftConfig.from_pretrained(str(tmp_path / "adapter")).target_modules
    assert len(saved) < 21 or isinstance(saved, str)  # the compressed form this test is about
    again = apply_lora(load_model(model_dir).model, LoraConfig(enabled=True, r=4, alpha=8, init_adapter=str(tmp_path)),
                       train_vision=False)
    assert sum(1 for _, m in again.named_modules() if hasattr(m, "lora_A")) == 21
    with pytest.raises(ValueError, match="target_modules: .*only there"):
        apply_lora(load_model(model_dir).model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj"],
                                                          init_adapter=str(tmp_path / "adapter")), train_vision=False)


def test_loss_is_the_mean_over_assistant_tokens_of_the_global_batch(tiny_model_dir, squares):
    """Labels reach the loss as rendered: only assistant tokens count, padding changes nothing, and
    micro-batch losses with the global divisor add up to the loss of the whole batch."""
    from llavakit.train.data import Collate, LazyDataset
    from llavakit.train.model import TrainModule
    from llavakit.train.setup import make_source

    cfg = config("instruct", tiny_model_dir, "unused", squares["qa"], squares["images"])
    lm = load_model(tiny_model_dir)
    source = make_source(cfg, lm, cfg.data.path)
    samples = [LazyDataset(source)[i] for i in (0, 1, 2, 41)]  # 41: a text-only record
    collate, module = Collate(lm.tokenizer.pad_token_id), TrainModule(lm.model, True).eval()
    whole = collate(samples)
    n = torch.tensor(float(whole.n_targets))
    with torch.no_grad():
        loss = module(**whole.model_inputs("cpu"), num_items=n)
        logits = lm.model(input_ids=whole.input_ids, pixel_values=whole.pixel_values,
                          attention_mask=whole.attention_mask).logits  # [B, T, V]
        target = whole.labels[:, 1:]  # [B, T-1]
        keep = target != -100
        manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep])
        parts = [module(**collate(s).model_inputs("cpu"), num_items=n) for s in (samples[:2], samples[2:])]
        one = torch.tensor(1.0)  # num_items 1: summed token loss
        together = module(**collate(samples[2:]).model_inputs("cpu"), num_items=one)  # the short one is padded
        apart = [module(**collate([s]).model_inputs("cpu"), num_items=one) for s in samples[2:]]
    rendered = sum(sum(1 for x in s.labels if x != -100) for s in samples)
    assert int(keep.sum()) == whole.n_targets == rendered < whole.n_tokens / 3  # prompts and images are not trained
    assert loss.item() == pytest.approx(manual.item(), abs=1e-5)
    assert sum(p.item() for p in parts) == pytest.approx(loss.item(), abs=1e-5)
    assert len(samples[2].input_ids) != len(samples[3].input_ids)
    assert together.item() == pytest.approx(sum(a.item() for a in apart), abs=1e-4)  # pad columns add nothing


@pytest.mark.parametrize("wrong", ["fewer", "more"])
@pytest.mark.parametrize("source", ["pixels", "features"])
def test_training_forward_raises_when_image_tokens_and_features_disagree(tiny_model_dir, squares, source, wrong):
    """The training forward (pixels, or cached features through the projector) scatters features into the
    `<image>` positions and raises naming both counts when they differ; it never trains on a misaligned batch."""
    from llavakit.train.data import Collate, LazyDataset
    from llavakit.train.model import TrainModule
    from llavakit.train.setup import make_source

    cfg = config("instruct", tiny_model_dir, "unused", squares["qa"], squares["images"])
    lm = load_model(tiny_model_dir)
    batch = Collate(lm.tokenizer.pad_token_id)([LazyDataset(make_source(cfg, lm, cfg.data.path))[0]])
    inputs = batch.model_inputs("cpu")
    image_id, n = lm.model.config.image_token_id, lm.image_seq_length
    if source == "features":  # the cached encoder output: [N, S, Dv]
        pixels = inputs.pop("pixel_values")
        layer = lm.model.config.vision_feature_layer
        hidden = lm.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
        inputs["image_features"] = hidden[:, 1:].detach()
    ids = inputs["input_ids"].clone()  # [1, T]
    assert int((ids == image_id).sum()) == n
    with torch.no_grad():
        TrainModule(lm.model, True)(**inputs, num_items=torch.tensor(1.0))  # as rendered: fine
    if wrong == "fewer":
        ids[0, (ids[0] == image_id).nonzero()[0, 0]] = lm.tokenizer.pad_token_id
    else:
        ids[0, (ids[0] != image_id).nonzero()[-1, 0]] = image_id
    found = n - 1 if wrong == "fewer" else n + 1
    with pytest.raises(ValueError, match=rf"image tokens do not match, tokens: {found}, features: "):
        TrainModule(lm.model, True)(**{**inputs, "input_ids": ids}, num_items=torch.tensor(1.0))


@pytest.mark.parametrize("source", ["pixels", "features"])
def test_a_micro_batch_without_images_still_runs_the_encoder_when_every_rank_must(tiny_model_dir, squares, source):
    """Under FSDP / DeepSpeed every module's forward is a collective: a text-only micro-batch runs the projector
    (and the tower, from pixels) on a blank image at weight 0, so its loss is unchanged and every rank joins."""
    from llavakit.train.data import Collate, LazyDataset
    from llavakit.train.model import TrainModule
    from llavakit.train.setup import make_source

    cfg = config("instruct", tiny_model_dir, "unused", squares["qa"], squares["images"])
    lm = load_model(tiny_model_dir)
    lm.model.requires_grad_(True)
    batch = Collate(lm.tokenizer.pad_token_id)([LazyDataset(make_source(cfg, lm, cfg.data.path))[41]])  # text only
    assert batch.pixel_values is None
    n = torch.tensor(float(batch.n_targets))
    plain = TrainModule(lm.model, True)(**batch.model_inputs("cpu"), num_items=n)
    plain.backward()
    projector = list(lm.model.model.multi_modal_projector.parameters())
    assert all(p.grad is None for p in projector)  # untouched: under FSDP this rank would skip a collective
    joined = TrainModule(lm.model, True, every_rank_encodes=source)(**batch.model_inputs("cpu"), num_items=n)
    joined.backward()
    assert joined.item() == plain.item()
    assert all(p.grad is not None and not p.grad.any() for p in projector)  # ran, with a zero gradient
    touched = {name for name, p in lm.model.model.vision_tower.named_parameters() if p.grad is not None}
    if source == "features":
        assert not touched  # cached features: the tower never runs, on any rank
        return
    lm.model.zero_grad(set_to_none=True)
    with_image = Collate(lm.tokenizer.pad_token_id)([LazyDataset(make_source(cfg, lm, cfg.data.path))[0]])
    TrainModule(lm.model, True)(**with_image.model_inputs("cpu"), num_items=n).backward()
    assert touched == {name for name, p in lm.model.model.vision_tower.named_parameters() if p.grad is not None}


def test_lora_target_modules_name_language_model_layers_only(tiny_model_dir):
    """peft matches `q_proj` by suffix, the vision tower's too: llavakit picks the LM's layers of that name."""
    from llavakit.train.config import LoraConfig
    from llavakit.train.model import apply_lora

    model = apply_lora(load_model(tiny_model_dir).model, LoraConfig(enabled=True, r=4, alpha=8,
                                                                   target_modules=["q_proj", "self_attn.v_proj"]),
                       train_vision=False)
    wrapped = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all("language_model" in name and name.endswith(("q_proj", "v_proj")) for name in wrapped)
    with pytest.raises(ValueError, match=r"lora.target_modules \['qkv'\]: no linear layer of the language model"):
        apply_lora(load_model(tiny_model_dir).model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "qkv"]),
                   train_vision=False)


def test_gradient_checkpointing_and_bf16_autocast(aligned, squares, tmp_path):
    runtimes = {"plain": {}, "ckpt": {"gradient_checkpointing": True}, "bf16": {"mixed_precision": "bf16"}}
    runs = {name: report(train(config("instruct", aligned, tmp_path / name, squares["qa"], squares["images"],
                                      runtime=rt, optim={"max_steps": 3}, eval={"at_start": False})))
            for name, rt in runtimes.items()}
    assert runs["plain"]["mixed_precision"] == "no"  # auto: fp32 on CPU (faster there than bf16)
    assert runs["ckpt"]["final_loss"] == pytest.approx(runs["plain"]["final_loss"], abs=1e-6)  # recomputed, same math
    assert runs["bf16"]["mixed_precision"] == "bf16" and runs["bf16"]["final_loss"] != runs["plain"]["final_loss"]
    assert runs["bf16"]["final_loss"] == pytest.approx(runs["plain"]["final_loss"], abs=0.05)


def run_cli_subprocess(args: list[str], **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", **env}
    return subprocess.run([sys.executable, "-m", "llavakit.cli", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=600)


def write_config(cfg: TrainConfig, path: Path, **changes) -> Path:
    data = copy.deepcopy(cfg.to_dict())
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        (data[section].__setitem__(leaf, value) if leaf else data.__setitem__(section, value))
    path.write_text(yaml.safe_dump(data))
    return path


def test_killed_run_resumes_exactly(aligned, squares, tmp_path):
    """SIGKILL right after step 5 (checkpoint at 4), resume: same losses and weights as one run."""
    cfg = config("instruct", aligned, tmp_path / "whole", squares["qa"], squares["images"],
                 optim={"lr": 5e-3, "epochs": 2}, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
                 checkpoint={"every_steps": 2, "keep_last": 1}, data={"num_workers": 1, "eval_size": 8})
    whole = train(cfg)
    path = write_config(cfg, tmp_path / "c.yaml", out=str(tmp_path / "split"), runtime__kill_after_step=5)
    killed = run_cli_subprocess(["train", str(path)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] == ["step-4"]
    resumed = train(TrainConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "split")}), resume=True)
    a, b = report(whole), report(resumed)
    assert b["resumed_from_step"] == 4 and a["steps"] == b["steps"] == 10
    assert b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-6)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6)
    assert a["padding_fraction_per_epoch"] == b["padding_fraction_per_epoch"] and a["tokens"] == b["tokens"]
    wa, wb = weights(whole / "model"), weights(resumed / "model")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(1, 11))  # each step once: the killed run's step 5 was dropped on resume


def test_resume_before_the_first_checkpoint_starts_over_in_place(aligned, squares, tmp_path):
    """A run stopped before its first checkpoint leaves config.yaml and a few metrics: --resume starts it again."""
    cfg = config("instruct", aligned, tmp_path / "whole", squares["qa"], squares["images"],
                 optim={"max_steps": 3}, data={"eval_size": 8})
    whole = train(cfg)
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints" / ".tmp-step-2").mkdir(parents=True)  # a checkpoint the stop cut short
    again = TrainConfig.from_dict({**cfg.to_dict(), "out": str(stopped)})
    (stopped / "config.yaml").write_text(again.to_yaml())
    (stopped / "metrics.jsonl").write_text('{"step": 0, "kind": "eval", "loss": 9.0}\n{"step": 1, "kind": "train"}\n')
    with pytest.raises(ConfigError, match="not empty"):
        train(again)
    resumed = train(again, resume=True)
    a, b = report(whole), report(resumed)
    assert b["steps"] == 3 and b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-6)
    records = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert 9.0 not in [r.get("loss") for r in records]  # the stopped start's records are gone
    assert not (stopped / "checkpoints" / ".tmp-step-2").exists()
    with pytest.raises(ConfigError, match="is a finished run"):  # no checkpoint to continue: refused, not redone
        train(again, resume=True)
    assert report(resumed) == b
    with pytest.raises(FileNotFoundError, match="holds no training run"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "empty")}), resume=True)


def test_feature_cache_gives_the_same_losses(tiny_model_dir, squares, tmp_path):
    half = tmp_path / "half.json"
    half.write_text(json.dumps(json.loads(squares["caption"].read_text())[:20]))
    cache = {"feature_cache": str(tmp_path / "cache")}
    train(config("align", tiny_model_dir, tmp_path / "first", half, squares["images"], data=cache, optim={"max_steps": 1}))
    assert len(json.loads((tmp_path / "cache" / "meta.json").read_text())["images"]) == 20
    plain = config("align", tiny_model_dir, tmp_path / "plain", squares["caption"], squares["images"])
    cached = config("align", tiny_model_dir, tmp_path / "cached", squares["caption"], squares["images"], data=cache)
    a, b = report(train(plain)), report(train(cached))  # the cache is extended to all 40 images
    assert b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    assert b["first_eval_loss"] == pytest.approx(a["first_eval_loss"], abs=1e-5)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert len(meta["images"]) == 40 and meta["shape"] == [16, 32]  # 16 patches x CLIP hidden 32, pre-projector


def test_stale_feature_cache_is_refused(tiny_model_dir, squares, tmp_path):
    from llavakit.model.io import has_cls_token, save_model
    from llavakit.train.features import StaleCacheError

    cache = str(tmp_path / "cache")
    train(config("align", tiny_model_dir, tmp_path / "a", squares["caption"], squares["images"],
                 data={"feature_cache": cache}, optim={"max_steps": 1}, eval={"at_start": False}))
    lm = load_model(tiny_model_dir)
    with torch.no_grad():
        next(lm.model.model.vision_tower.parameters()).add_(0.01)  # another encoder
    other = save_model(lm.model, lm.tokenizer, lm.image_processor, tmp_path / "other", has_cls=has_cls_token(lm.model.config))
    with pytest.raises(StaleCacheError, match="is stale"):
        train(config("align", other, tmp_path / "b", squares["caption"], squares["images"], data={"feature_cache": cache}))


def test_feature_cache_encodes_a_changed_image_again(tiny_model_dir, squares, tmp_path):
    import shutil

    from llavakit.data.images import load_image
    from llavakit.train.features import open_or_build, selected_features

    lm = load_model(tiny_model_dir)
    folder = tmp_path / "images"
    shutil.copytree(squares["images"], folder)
    names = sorted(p.name for p in folder.glob("*.png"))[:4]
    kw = dict(dtype="float32", batch_size=2, num_workers=0, is_main=True, barrier=lambda: None)
    first = open_or_build(tmp_path / "cache", lm.model, lm.image_processor, names, folder, **kw).read(names)  # [4, S, D]
    # the world regenerated under the same file names: image 0 now holds another picture
    shutil.copy(squares["images"] / sorted(p.name for p in squares["images"].glob("*.png"))[5], folder / names[0])
    store = open_or_build(tmp_path / "cache", lm.model, lm.image_processor, names, folder, **kw)
    again = store.read(names)  # [4, S, D]
    pixels = lm.image_processor([load_image(folder / names[0])], return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
    fresh = selected_features(lm.model, pixels)[0]  # [S, D]
    assert not torch.allclose(first[0], fresh, atol=1e-4)  # the pictures differ
    assert torch.allclose(again[0], fresh, atol=1e-5)  # the new picture's features, not the cached old ones
    assert torch.equal(again[1:], first[1:])  # the unchanged rows are kept as they were
    assert store.meta["images"].count(names[0]) == 1 and len(store.meta["digests"]) == 4


@pytest.fixture()
def bad_data(squares, tmp_path):
    records = json.loads(squares["caption"].read_text())[:15]
    png = (squares["images"] / "sq_1.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(png[: len(png) // 2])  # a truncated download
    bad = [
        {"id": "two-markers", "image": "sq_0.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]},
        {"id": "missing-image", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]},
        {"id": "corrupt-image", "image": str(tmp_path / "broken.png"), "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]},
        {"id": "not-an-image", "image": str(tmp_path / "notes.png"), "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]},
    ]
    (tmp_path / "notes.png").write_text("not a picture at all")  # found by the index pass (its header)
    def write(name, recs):
        path = tmp_path / name
        path.write_text(json.dumps(recs))
        return path
    return {"write": write, "good": records, "bad": {r["id"]: r for r in bad}}


@pytest.mark.parametrize("bad_id, message", [
    ("two-markers", "has 1 image(s) but 2 <image> marker(s)"),
    ("missing-image", "image file not found"),
    ("corrupt-image", "corrupt or truncated image"),
    ("not-an-image", "not an image"),
])
def test_bad_record_stops_training_naming_it(tiny_model_dir, squares, bad_data, tmp_path, bad_id, message):
    path = bad_data["write"]("d.json", bad_data["good"] + [bad_data["bad"][bad_id]])
    cfg = config("align", tiny_model_dir, tmp_path / "out", path, squares["images"],
                 data={"eval_size": 0}, optim={"batch_size": 16, "micro_batch_size": 8})
    with pytest.raises(ValueError) as exc:
        train(cfg)
    assert f"record '{bad_id}'" in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize("cached", [False, True], ids=["images", "feature-cache"])
def test_bad_records_skipped_are_counted_and_reported(tiny_model_dir, squares, bad_data, tmp_path, cached):
    path = bad_data["write"]("d.json", bad_data["good"] + list(bad_data["bad"].values()))  # 16 usable: one step
    data = {"eval_size": 0, "on_bad_record": "skip", "feature_cache": str(tmp_path / "fc") if cached else None}
    cfg = config("align", tiny_model_dir, tmp_path / "out", path, squares["images"],
                 data=data, optim={"batch_size": 16, "micro_batch_size": 8})
    r = report(train(cfg))
    assert r["skipped"]["count"] == 4 and r["steps"] == 1
    assert {s["id"] for s in r["skipped"]["records"]} == {"two-markers", "missing-image", "corrupt-image", "not-an-image"}
    reasons = {s["id"]: s["reason"] for s in r["skipped"]["records"]}
    assert "not found" in reasons["missing-image"] and "corrupt" in reasons["corrupt-image"]


def test_an_unexpected_error_in_a_worker_stops_the_run_naming_the_record(tiny_model_dir, squares, bad_data, tmp_path,
                                                                          monkeypatch):
    """Not a bad record the checks know: never skipped (it could hit every record), reported with the record's id."""
    from llavakit.train.data import LazyDataset

    real = LazyDataset._pixels

    def pixels(self, names):
        if names == ["sq_3.png"]:
            raise MemoryError("the image processor ran out of memory")
        return real(self, names)

    monkeypatch.setattr(LazyDataset, "_pixels", pixels)
    path = bad_data["write"]("d.json", bad_data["good"] + [dict(bad_data["good"][0], id="one-more")])  # 16: a step
    cfg = config("align", tiny_model_dir, tmp_path / "out", path, squares["images"],
                 data={"eval_size": 0, "on_bad_record": "skip"}, optim={"batch_size": 16, "micro_batch_size": 8})
    want = next(r["id"] for r in bad_data["good"] if r["image"] == "sq_3.png")
    with pytest.raises(ValueError, match=rf"record '{want}': unexpected error: MemoryError: the image processor ran out"):
        train(cfg)


def test_truncated_records_are_counted_and_reported(tiny_model_dir, squares, bad_data, tmp_path, capsys):
    long = {"id": "long-caption", "image": "sq_0.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square on white. " * 30}]}
    path = bad_data["write"]("d.json", bad_data["good"] + [long])  # 16 records: one step
    cfg = config("align", tiny_model_dir, tmp_path / "out", path, squares["images"], data={
        "eval_size": 0, "max_length": 120, "truncate": True}, optim={"batch_size": 16, "micro_batch_size": 8})
    r = report(train(cfg))
    assert r["steps"] == 1 and r["skipped"]["count"] == 0
    assert r["truncated"] == {"enabled": True, "max_length": 120, "count": 1, "train": 1, "eval": 0,
                              "ids": ["long-caption"], "ids_shown_max": 50}
    assert "data.truncate: 1 record(s) cut at max_length 120 (1 train, 0 eval) (ids: long-caption)" in capsys.readouterr().out


def test_the_records_an_incomplete_last_batch_leaves_out_are_said_on_screen(tiny_model_dir, squares, bad_data, tmp_path, capsys):
    path = bad_data["write"]("d.json", bad_data["good"] + [dict(r, id=f"{r['id']}-again") for r in bad_data["good"][:3]])
    cfg = config("align", tiny_model_dir, tmp_path / "out", path, squares["images"],
                 data={"eval_size": 0}, optim={"batch_size": 16, "micro_batch_size": 8})
    r = report(train(cfg))
    left = r["records"]["train"] - 16
    assert r["steps"] == 1 and r["records"]["dropped_incomplete_batch_per_epoch"] == left > 0
    want = f"optim.batch_size 16: {16 + left} training records make 1 full global batch(es) per epoch; {left} record(s) are never trained"
    assert want in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["llava-1.5-7b/align.yaml", "llava-1.5-7b/instruct.yaml", "llava-1.5-7b-lora/instruct.yaml"])
def test_dry_run_of_the_7b_recipes(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["train", f"configs/{recipe}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: ok" in out and "FAIL" not in out and "stand-in run: 2 steps" in out
    assert "ZeRO stage" in out and "8 proc -> 1 accumulation step(s)" in out


TINY_RECIPES = sorted(p.name for p in (REPO / "configs" / "tiny").glob("*.yaml"))


def test_tiny_recipes_are_shipped():
    assert set(TINY_RECIPES) >= {"align.yaml", "instruct.yaml", "instruct-lora.yaml"}


@pytest.mark.parametrize("recipe", TINY_RECIPES)
def test_dry_run_of_the_tiny_recipes(recipe, capsys, monkeypatch):
    """The CPU recipes of docs/training.md's quick start: config valid, their pipeline runs on stand-ins."""
    from llavakit.train.config import load_config

    monkeypatch.chdir(REPO)
    path = f"configs/tiny/{recipe}"
    cfg = load_config(path)
    assert main(["train", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: ok" in out and "FAIL" not in out and "stand-in run: 2 steps" in out
    assert f"lr {cfg.optim.lr} " in out and f"lora {cfg.lora.enabled}" in out  # the recipe's own settings ran


def test_dry_run_reports_a_broken_deepspeed_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    ds = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = "auto"
    ds["optimizer"] = {"type": "AdamW"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    rc = main(["train", "configs/llava-1.5-7b/instruct.yaml", "--dry-run", f"runtime.deepspeed={tmp_path / 'ds.json'}"])
    out = capsys.readouterr().out
    assert rc == 1 and "zero_optimization.reduce_bucket_size must be a number" in out and "remove 'optimizer'" in out


def test_train_clip_is_delegated(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("llavakit.train.clip_cli")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "llavakit.train.clip_cli", fake)
    assert main(["train", "clip", "--epochs", "3", "data.json"]) == 7 and seen == [["--epochs", "3", "data.json"]]


def test_train_clip_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llavakit.train.clip_cli", None)
    assert main(["train", "clip", "--epochs", "3"]) == 1
    assert "llavakit.train.clip_cli is not installed" in capsys.readouterr().err


def test_cli_refuses_a_used_out_dir_and_unknown_keys(aligned, capsys):
    assert main(["train", str(aligned / "config.yaml")]) == 1
    assert "exists and is not empty (use --resume" in capsys.readouterr().err
    assert main(["train", str(aligned / "config.yaml"), "optim.learning_rate=1"]) == 1
    assert "unknown key 'optim.learning_rate'" in capsys.readouterr().err


def colour_accuracy(model_dir, records, images, colours) -> float:
    """Share of held-out images whose true colour is the likeliest of `colours` as the answer."""
    from llavakit.data.render import RenderOptions, render_record

    lm = load_model(model_dir)
    opts, hits = RenderOptions(lm.image_seq_length), 0
    for rec in records:
        pixels = lm.image_processor([Image.open(images / rec["image"]).convert("RGB")], return_tensors="pt")["pixel_values"]
        scores = {}
        for colour in colours:
            r = {**rec, "conversations": [rec["conversations"][0], {"from": "gpt", "value": colour}]}
            s = render_record(r, lm.tokenizer, lm.template, opts)
            with torch.no_grad():
                out = lm.model(input_ids=torch.tensor([s.input_ids]), pixel_values=pixels, labels=torch.tensor([s.labels]))
            scores[colour] = out.loss.item()
        hits += min(scores, key=scores.get) == rec["conversations"][1]["value"]
    return hits / len(records)


def test_init_align_instruct_pipeline_learns(tmp_path, capsys):
    """`llavakit init` -> `train` align -> `train` instruct (CLI, YAML) on coloured squares; the
    model learns to answer "What colour is the square?" about held-out images."""
    from llavakit.model import tiny
    from llavakit.train.synthetic import caption_records, instruct_records, write_images

    colours = ["blue", "green", "red", "yellow"]
    images = write_images(tmp_path / "images", 120, seed=3, colours=colours)
    (tmp_path / "cap.json").write_text(json.dumps(caption_records(images[:100])))
    (tmp_path / "qa.json").write_text(json.dumps(instruct_records(images[:100], text_only=4)))
    held = instruct_records(images[100:], seed=9)
    (tmp_path / "held.json").write_text(json.dumps(held))
    vision, lm = tiny.tiny_clip(tmp_path / "clip"), tiny.tiny_llama(tmp_path / "llama", hidden=128)
    assert main(["init", "--vision", str(vision), "--lm", str(lm), "--out", str(tmp_path / "init")]) == 0
    data = {"image_folder": str(tmp_path / "images"), "num_workers": 2}
    stages = {
        "align": {"stage": "align", "init_from": str(tmp_path / "init"), "out": str(tmp_path / "align"),
                  "data": {**data, "path": str(tmp_path / "cap.json"), "eval_size": 8}, "optim": {"epochs": 2}},
        "instruct": {"stage": "instruct", "init_from": str(tmp_path / "align"), "out": str(tmp_path / "instruct"),
                     "data": {**data, "path": str(tmp_path / "qa.json"), "eval_path": str(tmp_path / "held.json"),
                              "feature_cache": str(tmp_path / "features")},
                     "optim": {"epochs": 8, "lr": 2e-3}, "eval": {"every_steps": 12}},
    }
    for name, stage in stages.items():
        stage["optim"].update(batch_size=16, micro_batch_size=8)
        stage["log"] = {"progress": False}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(stage))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0, capsys.readouterr().err
    out = tmp_path / "instruct"
    assert {"model", "metrics.jsonl", "tb", "loss.png", "config.yaml", "report.json"} <= {p.name for p in out.iterdir()}
    r = report(out)
    assert r["steps"] == 8 * (104 // 16) and r["eval_loss"] < 0.4 * r["first_eval_loss"]  # held-out loss drops
    before = colour_accuracy(tmp_path / "init", held, tmp_path / "images", colours)
    after = colour_accuracy(out / "model", held, tmp_path / "images", colours)
    assert after >= 0.8 and after >= before + 0.4, (before, after)  # answers about unseen images improve
    assert [h["stage"] for h in load_model(out / "model").meta.history] == ["align", "instruct"]


def test_vision_tower_gets_its_own_learning_rate(tiny_model_dir):
    """train_vision: the tower is trainable in its own AdamW groups at optim.vision_lr; frozen otherwise."""
    from llavakit.train.config import OptimConfig
    from llavakit.train.model import param_groups, set_trainable

    model = load_model(tiny_model_dir).model
    set_trainable(model, train_lm=False, train_vision=True)
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-3, vision_lr=1e-5, projector_lr=2e-3))}
    assert set(groups) == {"projector", "projector_no_decay", "vision", "vision_no_decay"}
    assert groups["vision"]["lr"] == 1e-5 and groups["projector"]["lr"] == 2e-3
    n_vision = sum(p.numel() for g in ("vision", "vision_no_decay") for p in groups[g]["params"])
    assert n_vision == sum(p.numel() for p in model.model.vision_tower.parameters())
    set_trainable(model, train_lm=True, train_vision=False)
    groups = {g["name"] for g in param_groups(model, OptimConfig(lr=1e-3, vision_lr=1e-5))}
    assert not any(name.startswith("vision") for name in groups)
    with pytest.raises(ValueError, match="optim.vision_lr"):
        OptimConfig(vision_lr=0.0)


def test_instruct_lora_with_train_vision_exports_the_tuned_tower(aligned, squares, tmp_path):
    """LoRA + train_vision: the tower trains (as a peft saved module) at vision_lr and the merged export carries it."""
    from transformers import LlavaForConditionalGeneration

    cfg = config("instruct", aligned, tmp_path / "lora_vision", squares["qa"], squares["images"], train_vision=True,
                 optim={"lr": 1e-2, "projector_lr": 1e-3, "vision_lr": 1e-3},
                 lora={"enabled": True, "r": 4, "alpha": 8, "save_adapter": True})
    out = train(cfg)
    hf, info = LlavaForConditionalGeneration.from_pretrained(out / "model", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    before, after = weights(aligned / "model"), weights(out / "model")
    tower = [k for k in before if "vision_tower" in k and k.endswith("weight")]
    assert tower and any(not torch.equal(before[k], after[k]) for k in tower)  # the tower was tuned and exported
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert rows[0]["lr"] / rows[0]["vision_lr"] == pytest.approx(10.0)


def test_feature_cache_key_ignores_where_the_encoder_was_loaded_from(tiny_model_dir):
    from llavakit.train.features import encoder_key

    lm = load_model(tiny_model_dir)
    key = encoder_key(lm.model, lm.image_processor)
    lm.model.config.vision_config._name_or_path = "/somewhere/else/encoder"
    assert encoder_key(lm.model, lm.image_processor) == key
    lm.model.config.vision_feature_layer = -1  # what does change the features changes the key
    assert encoder_key(lm.model, lm.image_processor) != key


def test_resume_on_another_number_of_processes_is_refused(tmp_path):
    """The global batch's split over processes and accumulation steps depends on the process count."""
    from types import SimpleNamespace

    from llavakit.train import checkpoint as ckpt
    from llavakit.train.setup import restore

    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps({"step": 4, "processes": 2}))
    loaded = []
    run = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, load_state=loaded.append))
    with pytest.raises(ValueError, match=r"saved by a run on 2 process\(es\), this one has 1: resume on as many"):
        restore(run, tmp_path)
    assert loaded == []  # refused before accelerate touched the model

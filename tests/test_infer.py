"""Inference: batched greedy decode, streaming, chat with KV reuse, multi-image, predict, chat CLI, int8."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavakit.data.images import ImageError
from llavakit.infer.api import load_pipeline
from llavakit.infer.params import SamplingParams
from llavakit.infer.prompt import PromptError

RED = Image.new("RGB", (40, 30), (200, 20, 20))
BLUE = Image.new("RGB", (30, 50), (20, 20, 200))
GREEDY12 = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU every parallel region's barrier stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


@pytest.fixture()
def image_files(tmp_path):
    RED.save(tmp_path / "red.png")
    BLUE.save(tmp_path / "blue.jpg")
    data = (tmp_path / "red.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])  # a truncated PNG
    return tmp_path


def test_engine_passes_the_cache_by_the_name_transformers_takes(pipe):
    """transformers 5.x deprecates `past_key_values` for `cache` (gone in 5.40); no deprecation warning here."""
    import inspect
    import warnings

    from transformers import LlavaForConditionalGeneration

    from llavakit.infer.engine import cache_kwarg

    params = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    assert cache_kwarg(pipe.lm.model) == pipe.engine.cache_kwarg == ("cache" if "cache" in params else "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert pipe.complete([([RED], "<image>\nWhat is this?")], SamplingParams(max_new_tokens=3))[0].token_ids


def test_batch_gives_each_row_its_greedy_tokens_alone(pipe):
    batch = [([RED], "<image>\nWhat is this?"), ([], "How many objects are there in the picture, and what colours?"),
             ([RED, BLUE], "<image> and <image>: which is larger?")]
    together = pipe.complete(batch, GREEDY12)
    assert len({c.prompt_tokens for c in together}) == 3  # different lengths: the decode cache is left-padded
    for item, c in zip(batch, together):
        alone = pipe.complete([item], GREEDY12)[0]
        assert alone.token_ids == c.token_ids and alone.text == c.text
    assert pipe.generate(batch, max_new_tokens=12) == [c.text for c in together]


def test_rows_joining_a_running_batch_get_their_own_tokens(pipe):
    items = [([RED], "<image>\nWhat is this?"), ([], "How many objects are there in the picture?"),
             ([RED, BLUE], "<image> and <image>: which is larger?")]
    alone = [pipe.complete([it], GREEDY12)[0].token_ids for it in items]
    rows = [pipe.row(pipe.prompt(*it), GREEDY12) for it in items]
    joins, step = {2: [rows[1]], 5: [rows[2]]}, 0

    def admit():
        nonlocal step
        step += 1
        return joins.pop(step, [])

    seen = [ev.row for events in pipe.engine.run(rows[:1], admit=admit) for ev in events]
    assert seen[:3] == [0, 0, 0] and max(seen) == 2  # row 1 joined after step 2, row 2 after step 5
    assert [tuple(r.generated) for r in rows] == alone


@pytest.mark.parametrize("packed", [False, True], ids=["fp32-linear", "fused-dense"])
def test_greedy_tokens_match_transformers_generate(tiny_model_dir, packed):
    from llavakit.infer.optimize import linear_summary

    p = load_pipeline(tiny_model_dir, fast=packed)
    assert linear_summary(p.lm.model) == ({"fused": 10, "dense": 5} if packed else {"fp32": 15})
    assert p.engine.decode_step is not None
    ours = p.complete([([RED], "<image>\nDescribe the image.")], SamplingParams(max_new_tokens=16))[0]
    prompt = p.prompt([RED], "<image>\nDescribe the image.")
    ids = torch.tensor([prompt.ids])  # [1, T]
    ref = load_pipeline(tiny_model_dir, fast=False).lm.model
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values([RED]),
                       max_new_tokens=16, do_sample=False, suppress_tokens=[p.image_token_id])  # [1, T+n]
    assert list(ours.token_ids) == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["fp32", "fused", "int8"])
def test_decode_step_gives_the_model_forward_tokens(tiny_model_dir, kind):
    """The fast one-token step against the model's own forward, on a left-padded batch and alone."""
    p = load_pipeline(tiny_model_dir, fast=kind == "fused", int8=kind == "int8")
    batch = [([RED], "<image>\nDescribe the image."), ([], "Name three colours, then three shapes, and count them."),
             ([BLUE], "<image>\nWhat is it?")]
    fast = p.complete(batch, SamplingParams(max_new_tokens=16))
    step, p.engine.decode_step = p.engine.decode_step, None
    slow = p.complete(batch, SamplingParams(max_new_tokens=16))
    assert step is not None and [c.token_ids for c in fast] == [c.token_ids for c in slow]


def test_multirow_products_go_through_onednn_and_give_the_mkl_tokens(tiny_model_dir, monkeypatch):
    """Products of several rows (prefill, batched steps) use oneDNN's prepacked weights; one row keeps MKL."""
    from torch.profiler import ProfilerActivity, profile

    from llavakit.infer.engine import ONEDNN_ENV, DecodeBatch
    from llavakit.infer.optimize import DenseLinear

    monkeypatch.setenv(ONEDNN_ENV, "0")
    mkl = load_pipeline(tiny_model_dir)
    monkeypatch.setenv(ONEDNN_ENV, "1")
    dnn = load_pipeline(tiny_model_dir)
    dense = [m for m in (*dnn.lm.model.modules(),) if isinstance(m, DenseLinear)]
    assert mkl.engine.onednn_linears == 0 and dnn.engine.onednn_linears == len(dense) > 0
    assert load_pipeline(tiny_model_dir, int8=True).engine.onednn_linears == 0
    assert load_pipeline(tiny_model_dir, fast=False).engine.onednn_linears == 0
    batch = [([RED], "<image>\nDescribe the image."), ([], "Name three colours, then three shapes."),
             ([BLUE], "<image>\nWhat is it?")]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        together = dnn.complete(batch, SamplingParams(max_new_tokens=16))
    assert any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())
    by_mkl = mkl.complete(batch, SamplingParams(max_new_tokens=16))
    assert [c.token_ids for c in together] == [c.token_ids for c in by_mkl]
    logits = []
    for p in (mkl, dnn):
        b = DecodeBatch()
        for i, item in enumerate(batch):
            p.engine._join(b, i, p.row(p.prompt(*item), GREEDY12), None, 0)
        tokens = torch.tensor([[5], [7], [9]])  # [3, 1]
        logits.append(p.engine.step(tokens, b.next_pos[:, None], b.step_mask(), b.cache))  # [3, V]
    assert torch.allclose(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    alone = DecodeBatch()
    dnn.engine._join(alone, 0, dnn.row(dnn.prompt(*batch[1]), GREEDY12), None, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dnn.engine.step(tokens[:1], alone.next_pos[:, None], alone.step_mask(), alone.cache)
    assert not any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())  # one row: MKL's product


def test_compiled_decode_step_is_opt_in(tiny_model_dir, monkeypatch):
    from llavakit.infer.engine import COMPILE_ENV

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert load_pipeline(tiny_model_dir).engine.compiled_step is None
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert load_pipeline(tiny_model_dir).engine.compiled_step is not None  # compiles at its first step
    assert load_pipeline(tiny_model_dir, int8=True).engine.compiled_step is None  # needs fp32 packed linears


def test_compiled_decode_step_gives_generate_tokens_without_recompiling(tiny_model_dir):
    from torch._dynamo.utils import counters

    p = load_pipeline(tiny_model_dir)
    p.engine.compile_decode()
    item = ([RED], "<image>\nDescribe the image.")
    longer = ([BLUE], "<image>\nDescribe the image. " + "Be brief. " * 40)
    ours = p.complete([item], SamplingParams(max_new_tokens=16))[0]
    prompt = p.prompt(*item)
    ids = torch.tensor([prompt.ids])  # [1, T]
    ref = load_pipeline(tiny_model_dir, fast=False).lm.model
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values([RED]),
                       max_new_tokens=16, do_sample=False, suppress_tokens=[p.image_token_id])  # [1, T+n]
    assert list(ours.token_ids) == out[0, ids.shape[1]:].tolist()
    assert p.engine.compiled_step.compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    long_answer = SamplingParams(max_new_tokens=300, min_new_tokens=300)
    compiled = p.complete([longer], long_answer)[0]  # another cache size, and it grows mid-answer
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # capacity is a dynamic dimension
    p.engine.compiled_step = None
    assert p.complete([longer], long_answer)[0].token_ids == compiled.token_ids


def test_qwen2_fused_biased_linears_and_decode_step_give_generate_tokens(tiny_parts, tmp_path):
    """Qwen2 has q/k/v biases: the fused product carries them, and `DecodeStep` covers this family too."""
    from conftest import make_model

    from llavakit.infer.api import Pipeline
    from llavakit.infer.optimize import linear_summary
    from llavakit.model.io import load_model

    model_dir = make_model(tiny_parts, tmp_path / "m", vision="siglip", lm="qwen2", projector="linear",
                           template="chatml")
    lms = [load_model(model_dir), load_model(model_dir)]
    for lm in lms:  # random (not zero) q/k/v biases, the same in both copies
        torch.manual_seed(0)
        for name, param in lm.model.model.language_model.named_parameters():
            if name.endswith("_proj.bias"):
                param.data.normal_(0, 0.5)
    p, ref = Pipeline(lms[0]), lms[1].model
    assert p.engine.decode_step is not None and "fused" in linear_summary(p.lm.model)
    item = ([RED], "<image>\nDescribe the image.")
    ours = p.complete([item], SamplingParams(max_new_tokens=16))[0]
    prompt = p.prompt(*item)
    ids = torch.tensor([prompt.ids])  # [1, T]
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p.pixel_values([RED]),
                       max_new_tokens=16, do_sample=False, suppress_tokens=[p.image_token_id])  # [1, T+n]
    assert list(ours.token_ids) == out[0, ids.shape[1]:].tolist()


def test_compiled_decode_step_keeps_kv_reuse_across_chat_turns(tiny_model_dir):
    """Compiled single-row steps write into the slab buffers in place: turns that reuse a cropped cache
    (stale positions past the crop) must give the eager step's answers."""
    compiled, eager = load_pipeline(tiny_model_dir), load_pipeline(tiny_model_dir)
    compiled.engine.compile_decode()
    sessions = [compiled.session(), eager.session()]
    for s in sessions:
        s.add_image(RED)
    for question in ["What is this?", "What colour is it?"]:
        assert sessions[0].ask(question, GREEDY12) == sessions[1].ask(question, GREEDY12)
    for s in sessions:
        s.messages[0]["content"] = s.messages[0]["content"].replace("What is", "Describe")  # crop mid-cache
    assert sessions[0].ask("And now?", GREEDY12) == sessions[1].ask("And now?", GREEDY12)
    assert sessions[0].stats.reused_tokens > 0


def test_unmerged_lora_layers_are_left_whole_by_packing(tiny_model_dir):
    from peft import LoraConfig, inject_adapter_in_model

    from llavakit.infer.api import Pipeline
    from llavakit.infer.optimize import linear_summary
    from llavakit.model.io import load_model

    pipes = []
    for fast in (True, False):
        lm = load_model(tiny_model_dir)
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)")
        inject_adapter_in_model(config, lm.model)
        pipes.append(Pipeline(lm, fast=fast))
    kinds = linear_summary(pipes[0].lm.model)
    assert kinds.get("fp32", 0) > 0 and "dense" in kinds  # LoRA base layers kept, the rest packed
    item = [([RED], "<image>\nDescribe the image.")]
    assert pipes[0].complete(item, GREEDY12)[0].token_ids == pipes[1].complete(item, GREEDY12)[0].token_ids


def test_decode_step_logits_match_the_model_forward_with_padding(pipe):
    from llavakit.infer.engine import DecodeBatch

    prompts = [pipe.prompt([RED], "<image>\nWhat is this?"), pipe.prompt([], "How many objects are in the picture?")]
    logits = {}
    for name, use_step in (("step", True), ("forward", False)):
        batch = DecodeBatch()
        for i, prompt in enumerate(prompts):
            pipe.engine._join(batch, i, pipe.row(prompt, GREEDY12), None, 0)
        tokens = torch.tensor([[5], [7]])  # [2, 1]
        mask = batch.step_mask()  # [2, L] with left padding on one row
        assert mask is not None and not bool(mask.all())
        if use_step:
            logits[name] = pipe.engine.step(tokens, batch.next_pos[:, None], mask, batch.cache)  # [2, V]
        else:
            logits[name] = pipe.engine.forward(tokens, None, mask, batch.next_pos[:, None], batch.cache)
    assert torch.allclose(logits["step"], logits["forward"], atol=1e-4, rtol=1e-4)


def test_slab_cache_appends_in_place_and_follows_crop_select_and_replacement():
    from transformers.cache_utils import DynamicLayer

    from llavakit.infer.engine import SlabLayer

    torch.manual_seed(0)
    slab, ref = SlabLayer(), DynamicLayer()
    chunks = [torch.randn(3, 2, t, 4) for t in (5, 1, 1)]  # [b, heads, t, d]
    for c in chunks:
        slab.update(c, -c)
        ref.update(c, -c)
    assert torch.equal(slab.keys, ref.keys) and torch.equal(slab.values, ref.values)
    buffer = slab.keys.data_ptr()
    slab.update(chunks[1], chunks[1])
    ref.update(chunks[1], chunks[1])
    assert slab.keys.data_ptr() == buffer  # appended in place: no copy of the cache
    for layer in (slab, ref):
        layer.crop(-2)
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.update(chunks[2][:2], chunks[2][:2])
    assert torch.equal(slab.keys, ref.keys) and torch.equal(slab.values, ref.values)
    slab.keys, slab.values = ref.keys[:, :, 1:], ref.values[:, :, 1:]  # replaced from outside (e.g. a merge)
    slab.update(chunks[2][:2], chunks[2][:2])
    assert torch.equal(slab.keys[:, :, -1:], chunks[2][:2]) and torch.equal(slab.keys[:, :, :-1], ref.keys[:, :, 1:])


def test_prefill_groups_keep_similar_lengths_together():
    from llavakit.infer.engine import prefill_groups

    assert prefill_groups([609, 30, 610, 600, 31, 520], max_tokens=8192) == [[0, 2, 3], [1, 4], [5]]
    assert prefill_groups([609, 30, 610, 600, 31, 520]) == [[0], [1, 4], [2], [3], [5]]  # long prompts one by one
    assert prefill_groups([33] * 8) == [list(range(8))]
    assert prefill_groups([100] * 5, max_tokens=300) == [[0, 1, 2], [3, 4]]


def test_rows_prefilled_together_get_their_greedy_tokens_alone(pipe):
    from llavakit.infer.engine import prefill_groups

    items = [([RED], "<image>\nWhat is this?"), ([BLUE], "<image>\nWhat is that thing?"),
             ([BLUE, RED], "<image> <image> Which one?"), ([], "Say hi.")]
    lengths = [len(pipe.prompt(*it).ids) for it in items]
    assert len(set(lengths[:3])) == 3 and [0, 1, 2] in prefill_groups(lengths)  # right-padded in one forward
    together = pipe.complete(items, GREEDY12)
    for item, c in zip(items, together):
        assert pipe.complete([item], GREEDY12)[0].token_ids == c.token_ids


def test_stream_pieces_join_to_the_answer(pipe):
    pieces = list(pipe.stream([RED], "<image>\nWhat is this?", max_new_tokens=24))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == pipe.generate([([RED], "<image>\nWhat is this?")], max_new_tokens=24)[0]


def test_text_stream_holds_back_stop_strings_and_whitespace(pipe):
    from llavakit.infer.text import StopRule, TextStream

    tok = pipe.lm.tokenizer
    stream = TextStream(tok, StopRule.build(tok, ["the square"], [tok.eos_token_id]))
    pieces = []
    for t in tok("  There is a red circle left of the square. Yes", add_special_tokens=False)["input_ids"]:
        pieces.append(stream.push(t))
        assert "the squ" not in "".join(pieces)
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == stream.text == "There is a red circle left of"


def test_kv_reuse_gives_full_recompute_tokens_at_turn_3(pipe):
    reuse, fresh = pipe.session(), pipe.session(reuse_kv=False)
    for s in (reuse, fresh):
        s.add_image(RED)
    prompts = []
    for turn, question in enumerate(["What is this?", "What colour is it?", "Compare it with this one."]):
        if turn == 2:
            reuse.add_image(BLUE)
            fresh.add_image(BLUE)
        assert reuse.ask(question, GREEDY12) == fresh.ask(question, GREEDY12)
        if turn:
            assert reuse.stats.reused_tokens >= prompts[-1] and reuse.stats.prefilled_tokens < reuse.stats.prompt_tokens
        prompts.append(reuse.stats.prompt_tokens)
    assert (reuse.stats.prefilled_images, fresh.stats.prefilled_images) == (1, 2)  # the red image is encoded once
    assert fresh.stats.reused_tokens == 0
    full = pipe.complete([(reuse.images, reuse.messages[:-1])], GREEDY12)[0]
    assert full.text == reuse.messages[-1]["content"]


def test_a_bad_image_leaves_the_conversation_as_it_was(pipe, image_files):
    """add_image rejects what is not an image (and loads a path); an image edited into the history that is not one
    fails the turn before it starts: no dangling user message, and the next turn works."""
    from llavakit.data.images import ImageError
    from llavakit.infer.prompt import PromptError

    s = pipe.session()
    with pytest.raises(TypeError, match="not a bytes"):
        s.add_image(b"\x89PNG")
    with pytest.raises(ImageError, match="broken"):
        s.add_image(image_files / "broken.png")
    assert s.pending == []
    s.add_image(image_files / "red.png")
    s.ask("What is this?", GREEDY12)
    history = [dict(m) for m in s.messages]
    s.images[0] = str(image_files / "red.png")
    with pytest.raises(PromptError, match="image 0 is a str"):
        s.send("And now?", GREEDY12)
    assert s.messages == history
    s.images[0] = RED
    assert isinstance(s.ask("And now?", GREEDY12), str) and len(s.messages) == len(history) + 2


def test_kv_reuse_recomputes_from_the_first_difference(pipe):
    reuse, fresh = pipe.session(), pipe.session(reuse_kv=False)
    for s in (reuse, fresh):
        s.add_image(RED)
        s.ask("What is this?", GREEDY12)
        s.ask("Where is it?", GREEDY12)
        s.messages[0]["content"] = s.messages[0]["content"].replace("What is", "Describe")  # edit history
    assert reuse.ask("And now?", GREEDY12) == fresh.ask("And now?", GREEDY12)
    before = pipe.prompt([RED], "<image>\nWhat is this?").ids
    after = pipe.prompt([RED], "<image>\nDescribe this?").ids
    common = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert reuse.stats.reused_tokens == common and reuse.stats.prefilled_images == 0  # the image stays cached
    for s in (reuse, fresh):  # same tokens, new pixels: the image and everything after it is recomputed
        s.images[0] = BLUE
    assert reuse.ask("Again?", GREEDY12) == fresh.ask("Again?", GREEDY12)
    assert reuse.stats.prefilled_images == 1 and reuse.stats.reused_tokens == before.index(pipe.image_token_id)


def test_multi_image_prompt_uses_every_image_in_order(pipe):
    text = "First <image> then <image>: what changed?"

    def first_logits(images):  # [1, V]
        prompt = pipe.prompt(images, text)
        return pipe.engine.forward(torch.tensor([prompt.ids]), pipe.pixel_values(images), None, None, pipe.engine.new_cache())

    red_blue = first_logits([RED, BLUE])
    for other in ([BLUE, RED], [RED, RED], [BLUE, BLUE]):  # order matters, and each image is seen
        assert (first_logits(other) - red_blue).abs().max().item() > 1e-4
    assert torch.equal(first_logits([RED, BLUE]), red_blue)
    answer = pipe.complete([([RED, BLUE], text)], SamplingParams(max_new_tokens=8))[0]
    assert answer.prompt_tokens == len(pipe.prompt([RED, BLUE], text).ids) and answer.completion_tokens == 8
    with pytest.raises(PromptError, match=r"2 <image> marker\(s\) but 1 image\(s\)"):
        pipe.generate([([RED], text)])


def test_bad_inputs_name_the_culprit(pipe, tmp_path, image_files):
    with pytest.raises(PromptError, match="context is 2048"):
        pipe.generate([([], "red green blue " * 1500)])
    with pytest.raises(PromptError, match="item 1: .*1 <image> marker"):
        pipe.generate([([], "hi"), ([], "<image> what?")])
    with pytest.raises(PromptError, match="only appear in user messages"):
        pipe.complete([([], [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"},
                             {"role": "user", "content": "b"}])])
    with pytest.raises(FileNotFoundError, match="model 'nowhere/model' not found"):
        load_pipeline("nowhere/model")
    with pytest.raises(FileNotFoundError, match="not a model dir"):
        load_pipeline(tmp_path)
    with pytest.raises(ImageError, match="missing.png: image file not found"):
        pipe.load_images([image_files / "missing.png"])
    with pytest.raises(ImageError, match="broken.png: corrupt or truncated"):
        pipe.load_images([image_files / "broken.png"])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_seeded_sampling_does_not_depend_on_batch_mates(pipe):
    hot = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    item = ([RED], "<image>\nTell me a story.")
    alone = pipe.complete([item], hot)[0]
    batched = pipe.complete([([], "Hello!"), item], [GREEDY12, hot])[1]
    assert alone.token_ids == batched.token_ids
    assert pipe.complete([item], hot.with_(seed=8))[0].token_ids != alone.token_ids
    narrow = pipe.complete([item], hot.with_(top_p=1e-6, max_new_tokens=12))[0]  # top_p -> only the argmax survives
    assert narrow.token_ids == pipe.complete([item], GREEDY12)[0].token_ids


def test_min_new_tokens_blocks_eos_until_reached(pipe):
    from llavakit.infer.engine import early_stop_ids, sample

    eos = pipe.lm.tokenizer.eos_token_id
    row = pipe.row(pipe.prompt([], "hi"), SamplingParams(max_new_tokens=4, min_new_tokens=2))
    logits = torch.zeros(1, 400)  # [1, V]
    logits[0, eos] = 10.0
    assert sample(logits, [row.params], [None], [], [early_stop_ids(row, 400)]).item() != eos
    row.generated.extend([5, 6])
    assert sample(logits, [row.params], [None], [], [early_stop_ids(row, 400)]).item() == eos
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)


def _questions(path: Path) -> Path:
    rows = [{"question_id": i, "image": "red.png" if i % 2 else "blue.jpg", "text": f"Question {i}: what is this?"}
            for i in range(5)] + [{"question_id": "t", "text": "A text-only question."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_predict_writes_llava_answers_and_resumes(tiny_model_dir, image_files, capsys):
    from llavakit.cli import main

    q, out = _questions(image_files / "q.jsonl"), image_files / "answers" / "a.jsonl"
    args = ["predict", "--model", str(tiny_model_dir), "--questions", str(q), "--images-dir", str(image_files),
            "--out", str(out), "--max-new-tokens", "6", "--batch-size", "4"]
    assert main(args) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in first] == [0, 1, 2, 3, 4, "t"]
    assert all({"question_id", "prompt", "text", "model_id", "answer_id"} <= r.keys() for r in first)
    assert first[1]["prompt"] == "Question 1: what is this?" and first[0]["model_id"] == Path(tiny_model_dir).name
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:15])  # killed mid-write: 3 whole answers and a torn line
    assert main(args) == 0
    assert "3 answered, 3 already in" in capsys.readouterr().err
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in again] == [0, 1, 2, 3, 4, "t"]
    assert [r["text"] for r in again] == [r["text"] for r in first]  # greedy: same answers after resuming


def test_predict_bad_image_names_question_and_file(tiny_model_dir, image_files, capsys):
    from llavakit.cli import main

    q = image_files / "bad.jsonl"
    q.write_text(json.dumps({"question_id": "q7", "image": "broken.png", "text": "What?"}) + "\n")
    rc = main(["predict", "--model", str(tiny_model_dir), "--questions", str(q), "--images-dir", str(image_files),
               "--out", str(image_files / "o.jsonl")])
    assert rc == 1 and "question 'q7' (line 1): " in capsys.readouterr().err


def test_one_shot_chat_prints_only_the_answer(tiny_model_dir, image_files, pipe):
    expected = pipe.generate([([RED], "<image>\nWhat is this?")], max_new_tokens=10)[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "llavakit.cli", "chat", "--model", str(tiny_model_dir), "--image",
         str(image_files / "red.png"), "What is this?", "--max-new-tokens", "10", "--temperature", "0", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_chat_repl_survives_bad_images_and_resets(pipe, image_files):
    from llavakit.infer.chat import repl

    lines = [f"/image {image_files / 'missing.png'}", f"/image {image_files / 'broken.png'}", "/bogus",
             f"/image {image_files / 'red.png'}", "What is this?", "And now?", "/stats", "/reset", "Hi", "/quit"]
    out, err = io.StringIO(), io.StringIO()
    assert repl(pipe, [], SamplingParams(max_new_tokens=6), stdin=io.StringIO("\n".join(lines) + "\n"),
                stdout=out, stderr=err) == 0
    log = err.getvalue()
    assert "missing.png: image file not found" in log and "broken.png: corrupt or truncated" in log
    assert "unknown command '/bogus'" in log and "reused_tokens=" in log and "(conversation cleared)" in log
    session = pipe.session()
    session.add_image(RED)
    expected = [session.ask("What is this?", SamplingParams(max_new_tokens=6)),
                session.ask("And now?", SamplingParams(max_new_tokens=6)),
                pipe.session().ask("Hi", SamplingParams(max_new_tokens=6))]
    assert out.getvalue().splitlines() == expected


def test_int8_quantizes_the_lm_and_stays_close(tiny_model_dir):
    from llavakit.infer.optimize import linear_summary

    fp32, int8 = load_pipeline(tiny_model_dir, fast=False), load_pipeline(tiny_model_dir, int8=True)
    assert linear_summary(int8.lm.model) == {"int8": 15} and linear_summary(fp32.lm.model) == {"fp32": 15}
    prompt = fp32.prompt([RED], "<image>\nWhat is this?")
    ids, pixels = torch.tensor([prompt.ids]), fp32.pixel_values([RED])  # [1, T], [1, 3, H, W]
    a = fp32.engine.forward(ids, pixels, None, None, fp32.engine.new_cache())  # [1, V]
    b = int8.engine.forward(ids, pixels, None, None, int8.engine.new_cache())
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99
    assert len(int8.complete([([RED], "<image>\nWhat is this?")], GREEDY12)[0].token_ids) > 0


def test_int8_activations_are_quantized_per_token():
    from llavakit.infer.optimize import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = Int8Linear(lin)
    x, quiet, loud = torch.randn(1, 48), torch.randn(1, 48), 100 * torch.randn(1, 48)
    with torch.inference_mode():
        with_quiet, with_loud = q(torch.cat([x, quiet]))[0], q(torch.cat([x, loud]))[0]  # [40] row 0 of each
        exact, alone = lin(x)[0], q(x)[0]
    assert torch.equal(with_quiet, with_loud)  # a batch-mate's scale never touches this row
    for got in (with_quiet, alone):
        assert (got - exact).abs().max().item() < 0.05 * exact.abs().max().item()

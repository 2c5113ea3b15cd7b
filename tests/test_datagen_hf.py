"""The `hf` teacher with a tiny random Llama and a tokenizer built offline: its output is garbage, so
what is checked is that every rejection is counted with a reason, and cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llavakit.datagen.config import InstructConfig, SourceConfig, TeacherConfig
from llavakit.datagen.instruct import generate_instruct
from llavakit.datagen.teachers import TeacherFatal

WORLD = Path(__file__).parent / "fixtures" / "datagen" / "world"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_lm(out: Path, *, chat_template: str | None = CHAT_TEMPLATE, stop_early: bool = True) -> Path:
    """stop_early: every ordinary token ends generation (the generation config's eos ids), so its garbage ends
    before max_new_tokens and reaches the validator; without it the random model runs to the limit."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["Question: how many shapes are there? Answer: there are two shapes.",
              "A red circle in the top left and a blue square on the right."]
    tok.train_from_iterator(corpus * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if stop_early:
        model.generation_config.eos_token_id = [2, *range(4, len(fast))]
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def short_packs(root: Path) -> Path:
    """Small prompt packs (a long prompt makes the tiny CPU model slow for nothing)."""
    root.mkdir()
    two = "Question: What is it?\n===\nAnswer: A circle.\n===\nQuestion: Is it red?\n===\nAnswer: Yes."
    for kind, min_pairs, max_pairs, response in (("conversation", 2, 10, two),
                                                  ("reasoning", 1, 1, "Question: Why?\n===\nAnswer: Because.")):
        pack = {"version": "t1", "kind": kind, "context": "captions", "format": "qa", "min_pairs": min_pairs,
                "max_pairs": max_pairs, "system": "Write questions and answers.",
                "fewshot": [{"context": "A red circle.", "response": response}]}
        (root / f"{kind}.json").write_text(json.dumps(pack))
    return root


def test_hf_teacher_garbage_is_rejected_with_reasons_counted_and_cached(tmp_path):
    model = tiny_lm(tmp_path / "lm")
    src = SourceConfig(annotations=WORLD, images_dir=WORLD / "images", limit=3)
    cfg = InstructConfig(source=src, out=tmp_path / "data.json", cache_dir=tmp_path / "cache",
                         prompt_dir=short_packs(tmp_path / "packs"),
                         kinds=("conversation", "reasoning"), progress=False,
                         teacher=TeacherConfig(name="hf", model=str(model), max_tokens=12, temperature=1.0))
    report = generate_instruct(cfg, log=lambda m: None)
    t = report.totals
    assert t.items == 6 and t.records == 0 and t.rejected == 6
    assert t.calls == 12 and t.retried == 6  # sampling teacher: each rejected output asked once more
    assert sum(t.reasons.values()) == 6 and set(t.reasons) <= {"unlabelled_text", "no_blocks", "empty", "not_text",
                                                                 "bad_order", "unanswered_question", "degenerate"}
    assert json.loads((tmp_path / "data.json").read_text()) == []
    rejections = [json.loads(x) for x in (tmp_path / "data.rejections.jsonl").read_text().splitlines()]
    assert len(rejections) == 6 and all(r["code"] and r["message"] for r in rejections)
    assert report.info["model"] == str(model) and report.info["teacher"] == "hf"

    again = generate_instruct(cfg, log=lambda m: None)
    assert again.totals.calls == 0 and again.totals.rejected_cached == 6


def test_hf_teacher_output_cut_at_max_tokens_is_an_error_not_a_record(tmp_path):
    """A completion that hits max_new_tokens is `truncated` (as the openai teacher's finish_reason=length): not
    validated, not cached, asked again next run."""
    model = tiny_lm(tmp_path / "lm", stop_early=False)
    src = SourceConfig(annotations=WORLD, images_dir=WORLD / "images", limit=2)
    cfg = InstructConfig(source=src, out=tmp_path / "data.json", cache_dir=tmp_path / "cache",
                         prompt_dir=short_packs(tmp_path / "packs"), kinds=("reasoning",), progress=False,
                         teacher=TeacherConfig(name="hf", model=str(model), max_tokens=8, temperature=1.0))
    report = generate_instruct(cfg, log=lambda m: None)
    assert report.totals.rejected == 2 and report.totals.reasons == {"truncated": 2}
    assert generate_instruct(cfg, log=lambda m: None).totals.calls == 2  # not cached: asked again


def test_hf_teacher_prompt_uses_the_chat_template_and_is_reproducible(tmp_path):
    from llavakit.datagen.teachers.hf import HFTeacher

    teacher = HFTeacher(str(tiny_lm(tmp_path / "lm")), temperature=1.0, max_new_tokens=6)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert teacher._prompt(msgs) == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"
    a = teacher.complete(msgs, kind="detail", image_id=1)
    assert a == teacher.complete(msgs, kind="detail", image_id=1)  # seeded per (image, kind, attempt)
    assert isinstance(a, str)


def test_hf_teacher_without_chat_template_is_refused(tmp_path):
    from llavakit.datagen.teachers.hf import HFTeacher

    path = tiny_lm(tmp_path / "lm", chat_template=None)
    with pytest.raises(TeacherFatal, match="no chat template"):
        HFTeacher(str(path))

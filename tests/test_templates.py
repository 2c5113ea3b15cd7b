"""Golden masking tests: for every template, exactly the assistant turns (and their end-of-turn) are trained."""

from __future__ import annotations

import pytest

from llavakit.data.records import RecordError, parse_record
from llavakit.data.render import IGNORE_INDEX, RenderOptions, render_record, render_text
from llavakit.data.templates import IMAGE_TOKEN, ChatTemplate, get_template, template_names

SMOL_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MULTI = {"id": "m1", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "And the square?"},
    {"from": "gpt", "value": "Blue."},
]}
TEXT_ONLY = {"id": "t1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there."}]}
TWO_IMAGES = {"id": "i2", "images": ["a.png", "b.png"], "conversations": [
    {"from": "human", "value": "<image>\n<image>\nWhich image has more shapes?"},
    {"from": "gpt", "value": "The second one."},
]}
CAPTION = {"id": "c1", "image": "a.png", "conversations": [
    {"from": "human", "value": "Give a brief description.\n<image>"}, {"from": "gpt", "value": "A red circle."}]}


@pytest.fixture(scope="module")
def tok(tiny_parts):
    from transformers import AutoTokenizer

    from llavakit.model.build import add_tokens

    t = AutoTokenizer.from_pretrained(tiny_parts["llama"])
    add_tokens(t, get_template("chatml"))
    t.chat_template = SMOL_LIKE
    return t


def trained_pieces(tok, sample) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)); cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


OPTS = RenderOptions(image_seq_length=4)

GOLDEN = {
    "vicuna_v1": (
        "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: " + IMAGE_TOKEN * 4 + "\nWhat colour is the circle? "
        "ASSISTANT: The circle is red.</s>USER: And the square? ASSISTANT: Blue.</s>",
        [" The circle is red.</s>", " Blue.</s>"],
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant that can see images.<|im_end|>\n<|im_start|>user\n"
        + IMAGE_TOKEN * 4 + "\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n",
        ["The circle is red.<|im_end|>\n", "Blue.<|im_end|>\n"],
    ),
    "tokenizer": (
        "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n" + IMAGE_TOKEN * 4
        + "\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n",
        ["The circle is red.<|im_end|>\n", "Blue.<|im_end|>\n"],
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_multi_turn_golden(tok, name):
    template = get_template(name)
    s = render_record(MULTI, tok, template, OPTS)
    text, pieces = GOLDEN[name]
    assert tok.decode(s.input_ids) == text
    assert trained_pieces(tok, s) == pieces
    assert s.input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 4


def test_llava_v1_is_vicuna_v1(tok):
    a = render_record(MULTI, tok, get_template("llava_v1"), OPTS)
    b = render_record(MULTI, tok, get_template("vicuna_v1"), OPTS)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_plain_drops_user_text_and_trains_caption(tok):
    s = render_record(CAPTION, tok, get_template("plain"), OPTS)
    assert tok.decode(s.input_ids) == IMAGE_TOKEN * 4 + "A red circle.\n"
    assert trained_pieces(tok, s) == ["A red circle.\n"]
    assert all(label == IGNORE_INDEX for label in s.labels[:4])


def test_plain_refuses_a_record_of_several_turns(tok):
    """Stage 1 drops the user's text, so a second answer would be trained with no question: refused, named."""
    with pytest.raises(RecordError, match=r"'m1': template 'plain' \(stage 1\) trains one caption per record.* 2 assistant"):
        render_record(MULTI, tok, get_template("plain"), OPTS)


def test_plain_starts_with_bos_when_the_tokenizer_adds_one(tiny_parts):
    """LLaVA's plain tokenizes `<image>caption\\n` with the tokenizer's own BOS (Llama, Vicuna); SmolLM2's adds none."""
    from transformers import AutoTokenizer

    from llavakit.model.build import add_tokens

    with_bos = AutoTokenizer.from_pretrained(tiny_parts["llama"], add_bos_token=True)
    add_tokens(with_bos, get_template("plain"))
    s = render_record(CAPTION, with_bos, get_template("plain"), OPTS)
    assert s.input_ids[0] == with_bos.bos_token_id and with_bos.decode(s.input_ids[1:]) == IMAGE_TOKEN * 4 + "A red circle.\n"
    assert s.labels[0] == IGNORE_INDEX and trained_pieces(with_bos, s) == ["A red circle.\n"]
    without = render_record(CAPTION, tok_without_bos(tiny_parts), get_template("plain"), OPTS)
    assert len(without.input_ids) == len(s.input_ids) - 1  # no BOS: the tokenizer adds none
    with pytest.raises(ValueError, match="bos must be true, false or"):
        ChatTemplate.from_dict({**get_template("plain").to_dict(), "bos": "sometimes"})


def tok_without_bos(tiny_parts):
    from transformers import AutoTokenizer

    from llavakit.model.build import add_tokens

    t = AutoTokenizer.from_pretrained(tiny_parts["llama"])
    add_tokens(t, get_template("plain"))
    return t


ANSWER_END = {"vicuna_v1": ("</s>", " "), "chatml": ("<|im_end|>\n", ""), "tokenizer": ("<|im_end|>\n", ""),
              "plain": ("\n", "")}
"""Per template: what closes a trained answer, and what precedes it inside the trained span."""


@pytest.mark.parametrize("name", sorted(ANSWER_END))
def test_text_only_record(tok, name):
    s = render_record(TEXT_ONLY, tok, get_template(name), OPTS)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in s.input_ids
    end, lead = ANSWER_END[name]
    assert trained_pieces(tok, s) == [lead + "Hi there." + end]  # the answer and its end: nothing else trained


@pytest.mark.parametrize("name", sorted(ANSWER_END))
def test_several_images(tok, name):
    s = render_record(TWO_IMAGES, tok, get_template(name), OPTS)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert s.input_ids.count(image_id) == 8
    assert all(lab == IGNORE_INDEX for i, lab in zip(s.input_ids, s.labels) if i == image_id)
    end, lead = ANSWER_END[name]
    assert trained_pieces(tok, s) == [lead + "The second one." + end]


def test_template_matches_hf_apply_chat_template(tok):
    """The Jinja we generate is what HF's apply_chat_template renders."""
    for name in ("vicuna_v1", "chatml", "plain"):
        t = get_template(name)
        msgs = [{"role": "user", "content": "Hi <image>"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "More"}]
        saved = tok.chat_template
        try:
            tok.chat_template = t.jinja()
            hf = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        finally:
            tok.chat_template = saved
        assert hf == render_text(t, tok, msgs, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "tokenizer"])
def test_content_parts_render_like_llava_strings(tok, name):
    """A processor's apply_chat_template passes parts; the tokenizer's own template (SmolLM2's adds strings) too."""
    t = get_template(name)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
             {"role": "user", "content": "And?"}]
    plain = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A circle."},
             {"role": "user", "content": "And?"}]
    assert render_text(t, tok, parts, True) == render_text(t, tok, plain, True)
    assert t.jinja(t.jinja(tok.chat_template)) == t.jinja(tok.chat_template)  # saved and loaded again: unchanged


def test_plain_jinja_renders_the_user_turn_as_its_images_as_training_does(tok):
    """A stage-1 model's own chat template (HF, GGUF) drops the user's words, as `prepare_messages` does."""
    t = get_template("plain")
    asked = [{"role": "user", "content": [{"type": "text", "text": "Describe it."}, {"type": "image"}]}]
    assert render_text(t, tok, asked, True) == render_text(t, tok, [{"role": "user", "content": IMAGE_TOKEN}], True)
    assert render_text(t, tok, asked, True) == IMAGE_TOKEN


@pytest.mark.parametrize("record,needle", [
    ({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "x"}]},
     "1 image(s) but 0 <image> marker(s)"),
    ({"id": "b", "conversations": [{"from": "gpt", "value": "x"}]}, "turns must alternate"),
    ({"id": "c", "conversations": [{"from": "human", "value": "q"}]}, "last turn must be from 'gpt'"),
    ({"id": "d", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}, "turn 0 must be"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "missing or invalid 'id'"),
    ({"id": "e", "images": ["a", "b"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
     "2 image(s) but 1"),
    ({"id": "f", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]}, "only appear in human"),
])
def test_bad_records_raise_with_id(tok, record, needle):
    with pytest.raises(RecordError) as exc:
        render_record(record, tok, get_template("vicuna_v1"), OPTS)
    assert needle in str(exc.value)
    if "id" in record:
        assert repr(record["id"]) in str(exc.value)


def test_overlength_raises_unless_truncating(tok):
    long = {"id": "L", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 200}]}
    t = get_template("vicuna_v1")
    with pytest.raises(RecordError, match="'L'.*max_length 200"):
        render_record(long, tok, t, RenderOptions(4, max_length=200))
    s = render_record(long, tok, t, RenderOptions(4, max_length=200, truncate=True))
    assert s.truncated and len(s.input_ids) == 200 and len(s.labels) == 200
    assert s.input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 4


def test_truncation_never_cuts_image_tokens(tok):
    rec = {"id": "I", "image": "a.png", "conversations": [
        {"from": "human", "value": "word " * 60 + "<image>"}, {"from": "gpt", "value": "ok"}]}
    with pytest.raises(RecordError, match="cut image tokens"):
        render_record(rec, tok, get_template("vicuna_v1"), RenderOptions(64, max_length=70, truncate=True))


def test_boundary_mismatch_raises(tok):
    """A template whose assistant turn starts inside a word makes a token straddle the span."""
    t = ChatTemplate(name="broken", user_format="{content}", assistant_prefix="ans", assistant_format="wer {content}")
    rec = {"id": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(RecordError, match="'S'.*straddles"):
        render_record(rec, tok, t, OPTS)


def test_registry_exact_keys():
    assert {"plain", "vicuna_v1", "llava_v1", "chatml", "tokenizer"} <= set(template_names())
    with pytest.raises(KeyError, match="unknown chat template 'Vicuna_v1'"):
        get_template("Vicuna_v1")


def test_tokenizer_template_without_chat_template_errors(tiny_parts):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_parts["llama"])
    t.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        render_record(TEXT_ONLY, t, get_template("tokenizer"), OPTS)


def test_parse_record_keeps_order():
    conv = parse_record(TWO_IMAGES)
    assert conv.images == ["a.png", "b.png"] and [m["role"] for m in conv.messages] == ["user", "assistant"]


def test_a_template_that_refuses_the_messages_raises_a_clear_error():
    """Tokenizers' chat templates call raise_exception(...) (as transformers provides it) to reject a conversation."""
    from types import SimpleNamespace

    from llavakit.data.render import TemplateRefused, render_text

    template = SimpleNamespace(bos=False, jinja=lambda _: "{% if messages[0]['role'] != 'user' %}"
                                               "{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok")
    tokenizer = SimpleNamespace(chat_template=None, bos_token="", eos_token="")
    assert render_text(template, tokenizer, [{"role": "user", "content": "hi"}], True) == "ok"
    with pytest.raises(TemplateRefused, match="refused the messages: Conversation roles must alternate"):
        render_text(template, tokenizer, [{"role": "assistant", "content": "hi"}], True)

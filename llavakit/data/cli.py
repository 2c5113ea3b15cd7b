"""`llavakit data`: look at LLaVA JSON data the way the trainer will see it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect and check LLaVA JSON data", description="Inspect and check LLaVA JSON data.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    i = dsub.add_parser("inspect", help="print one record's tokens, trained ones marked",
                        description="Render one record with a model's tokenizer and template; trained tokens are shown [[like this]].")
    _common(i)
    i.add_argument("--index", type=int, default=0, help="record index (default 0)")
    i.set_defaults(func=run_inspect)
    c = dsub.add_parser("check", help="render every record; report errors and length statistics",
                        description="Render every record with a model's tokenizer and template; list every bad record by id.")
    _common(c)
    c.set_defaults(func=run_check)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="LLaVA JSON (list) or JSONL file")
    p.add_argument("--model", required=True, help="model dir (its tokenizer and recorded template are used)")
    p.add_argument("--template", default=None, help="override the model's template (e.g. plain)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per record")
    p.add_argument("--truncate", action="store_true", help="cut over-long records instead of failing")


def _setup(args):
    from transformers import AutoConfig, AutoTokenizer

    from llavakit.data.records import load_records
    from llavakit.data.render import RenderOptions
    from llavakit.data.templates import ChatTemplate, get_template
    from llavakit.model.modeling import LlavakitMeta

    config = AutoConfig.from_pretrained(args.model)
    template = get_template(args.template) if args.template else ChatTemplate.from_dict(LlavakitMeta.from_config(config).template)
    tok = AutoTokenizer.from_pretrained(args.model)
    opts = RenderOptions(config.image_seq_length, args.max_length, args.truncate)
    return load_records(args.file), tok, template, opts


def format_tokens(tokenizer, ids: list[int], labels: list[int], image_token_id: int) -> str:
    """Tokens as text; runs of image tokens collapsed, trained runs wrapped in [[...]]."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            out.append(f"<image x{j - i}>")
            i = j
            continue
        trained = labels[i] != -100
        j = i
        while j < len(ids) and ids[j] != image_token_id and (labels[j] != -100) == trained:
            j += 1
        text = tokenizer.decode(ids[i:j])
        out.append(f"[[{text}]]" if trained else text)
        i = j
    return "".join(out)


def run_inspect(args) -> int:
    from llavakit.data.render import render_record
    from llavakit.data.templates import IMAGE_TOKEN

    records, tok, template, opts = _setup(args)
    if not 0 <= args.index < len(records):
        raise ValueError(f"--index {args.index} out of range: {args.file} has {len(records)} records")
    s = render_record(records[args.index], tok, template, opts)
    n_trained = sum(1 for x in s.labels if x != -100)
    print(f"record {s.id!r}: {len(s.input_ids)} tokens, {n_trained} trained, template {template.name}, images {s.images}"
          + (" (truncated)" if s.truncated else ""))
    print(format_tokens(tok, s.input_ids, s.labels, tok.convert_tokens_to_ids(IMAGE_TOKEN)))
    return 0


def run_check(args) -> int:
    from llavakit.data.records import RecordError
    from llavakit.data.render import render_record

    records, tok, template, opts = _setup(args)
    lengths, bad, truncated = [], [], 0
    for n, rec in enumerate(records):
        try:
            s = render_record(rec, tok, template, opts)
        except RecordError as exc:
            bad.append(f"#{n}: {exc}")
            continue
        lengths.append(len(s.input_ids))
        truncated += s.truncated
    for line in bad:
        print(line)
    if lengths:
        lengths.sort()
        print(f"{len(lengths)} ok, {len(bad)} bad, {truncated} truncated; tokens min {lengths[0]} "
              f"median {lengths[len(lengths) // 2]} max {lengths[-1]}")
    else:
        print(f"0 ok, {len(bad)} bad")
    return 1 if bad else 0

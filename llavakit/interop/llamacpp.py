"""Run an exported GGUF pair in llama.cpp, prompted exactly as llavakit prompts: for checks and benchmarks.

Needs `llama-cpp-python` (not a llavakit dependency). The prompt is the model's own chat template
(recorded in the GGUF under `llavakit.template`) rendered by llavakit's render function, with each
`<image>` marker replaced by llama.cpp's media marker; images go through llama.cpp's own
preprocessing and encoder (`mtmd`). Decoding is greedy, stopping at EOS or the template's stops.

Benchmark with llama.cpp answers (the same runner and scorer as `llavakit eval`):

    python -m llavakit.interop.llamacpp --gguf runs/x/gguf --benchmark offline \\
        --data data/eval/offline.json --out runs/x/eval/offline-llamacpp
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace


def gguf_pair(gguf_dir: str | Path) -> tuple[Path, Path]:
    """(language model, mmproj) files in an `export --format gguf` dir."""
    d = Path(gguf_dir)
    lms, mms = sorted(d.glob("model-*.gguf")), sorted(d.glob("mmproj-*.gguf"))
    if len(lms) != 1 or len(mms) != 1:
        raise FileNotFoundError(f"{d}: expected one model-*.gguf and one mmproj-*.gguf, found {len(lms)} and {len(mms)}")
    return lms[0], mms[0]


def read_template(lm_path: Path):
    """The ChatTemplate and a tokenizer stand-in (bos/eos strings, chat_template) from the GGUF metadata."""
    import gguf

    from llavakit.data.templates import ChatTemplate
    from llavakit.interop.gguf import TEMPLATE_KEY

    fields = gguf.GGUFReader(lm_path).fields
    if TEMPLATE_KEY not in fields:
        raise ValueError(f"{lm_path}: no {TEMPLATE_KEY} record (not written by llavakit export)")
    tokens = fields["tokenizer.ggml.tokens"].contents()

    def token(key: str) -> str:
        return tokens[fields[key].contents()] if key in fields else ""

    chat = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    shim = SimpleNamespace(bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"),
                           chat_template=chat)
    return ChatTemplate.from_dict(json.loads(fields[TEMPLATE_KEY].contents())), shim


@lru_cache(maxsize=1)
def _silent_log():
    """A no-op log callback for llama.cpp's vision helpers (kept alive by the cache)."""
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


class LlamaCppLlava:
    """A llama.cpp language model plus its mtmd (vision) context."""

    def __init__(self, gguf_dir: str | Path, n_ctx: int = 0, threads: int = 2, verbose: bool = False):
        """n_ctx 0: the context length the GGUF records."""
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp import Llama

        lm_path, mm_path = gguf_pair(gguf_dir)
        self.template, self.tok = read_template(lm_path)
        self.llm = Llama(model_path=str(lm_path), n_ctx=n_ctx, n_threads=threads, verbose=verbose)
        if not verbose:
            mtmd.mtmd_helper_log_set(_silent_log(), None)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings = False, threads, False
        self.mtmd = mtmd
        self.ctx = mtmd.mtmd_init_from_file(str(mm_path).encode(), self.llm.model, params)
        if not self.ctx:
            raise ValueError(f"llama.cpp could not load {mm_path} (run with verbose=True for its log)")
        self.marker = mtmd.mtmd_default_marker().decode()

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    # -- inputs ----------------------------------------------------------------------------

    def prompt_text(self, user_text: str) -> str:
        """The template applied to one user turn, image markers in llama.cpp's form."""
        from llavakit.data.render import render_text
        from llavakit.data.templates import IMAGE_TOKEN

        text = render_text(self.template, self.tok, [{"role": "user", "content": user_text}], add_generation_prompt=True)
        return text.replace(IMAGE_TOKEN, self.marker)

    def _bitmap(self, image):
        import numpy as np

        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
        data = rgb.tobytes()
        return self.mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], (ctypes.c_uint8 * len(data)).from_buffer_copy(data))

    def chunks(self, images, text: str):
        """mtmd input chunks for `text` (with media markers) and its images; free with mtmd_input_chunks_free."""
        m = self.mtmd
        bitmaps = [self._bitmap(im) for im in images]
        try:
            chunks = m.mtmd_input_chunks_init()
            inp = m.mtmd_input_text()
            raw = text.encode()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
            arr = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                m.mtmd_input_chunks_free(chunks)
                raise ValueError(f"llama.cpp could not tokenize the prompt with {len(bitmaps)} image(s) (code {rc})")
            return chunks
        finally:
            for b in bitmaps:
                m.mtmd_bitmap_free(b)

    def image_embeddings(self, image):
        """llama.cpp's projected features of one image: [N, D_lm]."""
        import numpy as np

        m = self.mtmd
        chunks = self.chunks([image], self.marker)
        try:
            chunk = next(c for c in self._iter(chunks) if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            n = m.mtmd_input_chunk_get_n_tokens(chunk)
            if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                raise ValueError("llama.cpp failed to encode the image")
            d = self.llm.n_embd()
            return np.ctypeslib.as_array(m.mtmd_get_output_embd(self.ctx), shape=(n * d,)).reshape(n, d).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)

    def _iter(self, chunks):
        for i in range(self.mtmd.mtmd_input_chunks_size(chunks)):
            yield self.mtmd.mtmd_input_chunks_get(chunks, i)

    # -- decoding --------------------------------------------------------------------------

    def feed(self, images, text: str) -> None:
        """Reset, then evaluate the prompt: text chunks as tokens, image chunks through mtmd."""
        import llama_cpp

        m, llm = self.mtmd, self.llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        chunks = self.chunks(images, text)
        try:
            for chunk in self._iter(chunks):
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    llm.eval([ptr[i] for i in range(n.value)])
                    continue
                past = llama_cpp.llama_pos(0)
                rc = m.mtmd_helper_eval_chunk_single(self.ctx, llm._ctx.ctx, chunk, llm.n_tokens, 0, llm.n_batch, True, ctypes.byref(past))
                if rc != 0:
                    raise ValueError(f"llama.cpp failed to evaluate an image chunk (code {rc})")
                llm.n_tokens = past.value
        finally:
            m.mtmd_input_chunks_free(chunks)

    def last_logits(self):
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),)).copy()  # [V]

    def answer(self, images, user_text: str, max_new_tokens: int = 64) -> tuple[str, list[int]]:
        """Greedy answer to one user turn: (text cut at the first stop, generated ids)."""
        self.feed(images, self.prompt_text(user_text))
        stops = self.template.stop_strings(self.tok.eos_token)
        eos = self.llm.token_eos()
        ids: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.last_logits().argmax())
            if token == eos:
                break
            ids.append(token)
            text = self.llm.detokenize(ids).decode("utf-8", errors="replace")
            hit = [text.index(s) for s in stops if s in text]
            if hit:
                return text[: min(hit)], ids
            self.llm.eval([token])
        return self.llm.detokenize(ids).decode("utf-8", errors="replace"), ids


def predict_fn(runner: LlamaCppLlava, max_new_tokens: int | None = None):
    """A PredictFn for `llavakit.eval.runner.evaluate`: one item at a time, greedy."""
    from llavakit.data.images import load_image

    def predict(items):
        return [runner.answer([load_image(p) for p in it.images], it.prompt, max_new_tokens or it.max_new_tokens)[0] for it in items]

    return predict


def agreement(ours: str | Path, theirs: str | Path) -> dict[str, tuple[int, int]]:
    """Identical answers (case and outer space ignored) per group, from two `answers.jsonl` of one benchmark.

    The group is the middle of `<image>-<task>-<n>` question ids (the offline benchmark's), else "all";
    "all" always holds the total. Raises when the two files do not answer the same questions.
    """
    a, b = (_answers(Path(f)) for f in (ours, theirs))
    if a.keys() != b.keys():
        raise ValueError(f"{ours} and {theirs} answer different questions "
                         f"({len(a.keys() - b.keys())} only in the first, {len(b.keys() - a.keys())} only in the second)")
    table: dict[str, list[int]] = {}
    for qid, text in a.items():
        parts = qid.split("-")
        same = int(text.strip().lower() == b[qid].strip().lower())
        for group in {parts[1] if len(parts) == 3 else "all", "all"}:
            row = table.setdefault(group, [0, 0])
            row[0], row[1] = row[0] + same, row[1] + 1
    return {g: (v[0], v[1]) for g, v in sorted(table.items())}


def _answers(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(r["question_id"]): r["text"] for r in rows}


def agreement_table(rows: dict[str, tuple[int, int]]) -> str:
    lines = ["| group | identical answers | % |", "| --- | ---: | ---: |"]
    lines += [f"| {g} | {same}/{n} | {100 * same / n:.1f} |" for g, (same, n) in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llavakit.interop.llamacpp",
                                description="Run a llavakit benchmark with answers from llama.cpp (an `export --format gguf` dir).")
    p.add_argument("--gguf", required=True, help="dir with model-*.gguf and mmproj-*.gguf")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", metavar="ANSWERS", default=None,
                   help="llavakit's answers.jsonl for the same benchmark: also print how many answers are identical")
    args = p.parse_args(argv)
    from llavakit.eval.runner import evaluate

    runner = LlamaCppLlava(args.gguf, threads=args.threads)
    try:
        evaluate(args.benchmark, args.data, predict_fn(runner, args.max_new_tokens), args.out, batch_size=1,
                 model_id=f"llama.cpp:{Path(args.gguf).resolve()}", limit=args.limit, log=lambda m: print(m, file=sys.stderr))
    finally:
        runner.close()
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
    if args.compare:
        table = agreement_table(agreement(args.compare, Path(args.out) / "answers.jsonl"))
        (Path(args.out) / "agreement.md").write_text(table, encoding="utf-8")
        print(f"\nllama.cpp vs {args.compare}:\n{table}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generated tokens -> streamed text: incremental detokenization, stop strings, stripping.

The pieces a `TextStream` emits always concatenate to its final `text`: a piece is only emitted
once it can no longer change, so text that may still turn into a stop string, trailing whitespace
(the answer is stripped, as LLaVA strips it) and half a UTF-8 character are held back.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class StopRule:
    """When a row ends: on one of `token_ids`, or when the text contains one of `strings`."""

    token_ids: frozenset[int]
    strings: tuple[str, ...]

    @classmethod
    def build(cls, tokenizer, stop_strings, eos_ids) -> "StopRule":
        """Stop strings that are one (special) token become token ids; the rest are matched in text."""
        ids = {int(i) for i in eos_ids if i is not None}
        texts = []
        vocab = tokenizer.get_vocab()
        for s in dict.fromkeys(stop_strings):
            if s in vocab and s in tokenizer.all_special_tokens:
                ids.add(vocab[s])
            else:
                texts.append(s)
        return cls(frozenset(ids), tuple(texts))


class TextStream:
    """Incremental text of one generated answer."""

    def __init__(self, tokenizer, rule: StopRule):
        self.tokenizer = tokenizer
        self.rule = rule
        self.ids: list[int] = []
        self._raw = ""
        """Decoded text of `ids`, complete characters only; append-only."""
        self._prefix = 0
        self._read = 0
        self._sent = 0
        """Characters of the stripped text already emitted."""
        self._longest_stop = max((len(s) for s in rule.strings), default=0)
        self.stopped = False

    # Decoding a window and diffing against the previous window keeps leading spaces right for
    # SentencePiece tokenizers and never emits half of a multi-byte character.
    def _decode_new(self, final: bool = False) -> str:
        prefix = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(prefix):]
        return ""

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final. Sets `stopped`."""
        if self.stopped:
            raise RuntimeError("push after the stream stopped")
        if token in self.rule.token_ids:
            self.stopped = True
            return self._emit(final=True)
        self.ids.append(token)
        before = len(self._raw)
        self._raw += self._decode_new()
        if self.rule.strings and len(self._raw) > before:
            cut = self._find_stop(max(0, before - self._longest_stop + 1))
            if cut is not None:
                self._raw = self._raw[:cut]
                self.stopped = True
                return self._emit(final=True)
        return self._emit(final=False)

    def finish(self) -> str:
        """End the stream (length limit, cancel): flush what was held back, minus trailing space."""
        if not self.stopped:
            self._raw += self._decode_new(final=True)
            cut = self._find_stop(0) if self.rule.strings else None
            if cut is not None:
                self._raw = self._raw[:cut]
            self.stopped = True
        return self._emit(final=True)

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self._raw.find(s, start) for s in self.rule.strings) if i >= 0]
        return min(hits) if hits else None

    def _held_stop_prefix(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still grow into a stop string."""
        best = 0
        for s in self.rule.strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, final: bool) -> str:
        visible = self._raw.lstrip()
        held = 0 if final else self._held_stop_prefix(visible)
        # Whitespace before a possible stop string is held too: after a cut it would be trailing.
        end = len(visible[: len(visible) - held].rstrip())
        if end <= self._sent:
            return ""
        piece, self._sent = visible[self._sent:end], end
        return piece

    @property
    def text(self) -> str:
        """The answer so far: what has been emitted."""
        return self._raw.lstrip()[: self._sent]

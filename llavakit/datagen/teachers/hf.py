"""The `hf` teacher: a local transformers causal LM, prompted through its chat template."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from llavakit.datagen.teachers import TeacherError, TeacherFatal


class HFTeacher:
    name = "hf"
    max_concurrency = 1

    def __init__(self, path: str, *, temperature: float = 0.7, max_new_tokens: int = 1024, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.model = str(path)
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.deterministic = temperature == 0
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.lm = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise TeacherFatal(f"teacher hf: cannot load {path}: {exc}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise TeacherFatal(f"teacher hf: the tokenizer in {path} has no chat template")
        self.lm.eval()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config, *, dataset=None, on_retry=None) -> HFTeacher:
        return cls(config.model, temperature=config.temperature, max_new_tokens=config.max_tokens, seed=config.seed)

    @property
    def settings(self) -> dict:
        """Sampling settings that change its outputs (part of the cache key)."""
        return {"temperature": self.temperature, "max_new_tokens": self.max_new_tokens, "seed": self.seed}

    def _stop_ids(self) -> set[int]:
        """Token ids that end a completion: the tokenizer's EOS and the generation config's."""
        ids = self.lm.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())

    def _prompt(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates refuse a system role: fold it into the first user message.
            if messages and messages[0]["role"] == "system":
                rest = [dict(m) for m in messages[1:]]
                if rest and rest[0]["role"] == "user":
                    rest[0]["content"] = f"{messages[0]['content']}\n\n{rest[0]['content']}"
                return self.tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)
            raise

    def complete(self, messages: list[dict], *, kind: str, image_id: Any, attempt: int = 0) -> str:
        torch = self._torch
        prompt = self._prompt(messages)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        digest = hashlib.sha256(f"{self.seed}/{image_id}/{kind}/{attempt}".encode()).digest()
        sample = self.temperature > 0
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=sample,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.tokenizer.eos_token_id)
        if sample:
            kwargs["temperature"] = self.temperature
        with self._lock, torch.inference_mode():
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
            out = self.lm.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1]:]
        if len(new) >= self.max_new_tokens and int(new[-1]) not in self._stop_ids():
            raise TeacherError("truncated", f"the completion hit max_new_tokens ({self.max_new_tokens}) before its end")
        return self.tokenizer.decode(new, skip_special_tokens=True)

"""Sampling parameters of one generation (one row of a batch)."""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_MAX_NEW_TOKENS = 256
MIN_TEMPERATURE = 1e-6
"""The smallest sampling temperature above 0 (greedy)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is decoded. `temperature == 0` is greedy (top_p/top_k/seed are then unused)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    seed: int | None = None
    """Seed of this row's own sampler, so a sampled answer does not depend on its batch-mates."""
    stop: tuple[str, ...] = ()
    """Extra stop strings, on top of the template's and EOS."""
    min_new_tokens: int = 0
    """Stop tokens (EOS, single-token stop strings) are not sampled before this many tokens (fixed-length benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if not (float(self.temperature) == 0.0 or MIN_TEMPERATURE <= float(self.temperature) <= 100.0):
            # below MIN_TEMPERATURE, logits / temperature overflow float32 and sampling fails
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 100], got {self.temperature!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")  # torch's seed range
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

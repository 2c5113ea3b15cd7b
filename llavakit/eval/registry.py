"""The benchmark registry: name -> entry with `load(data_path)` and `score(items, answers)`."""

from __future__ import annotations

from llavakit.eval.common import Benchmark, EvalError
from llavakit.eval.gqa import GQA
from llavakit.eval.llava_bench import LlavaBench
from llavakit.eval.mme import MME
from llavakit.eval.offline import Offline
from llavakit.eval.pope import POPE
from llavakit.eval.scienceqa import ScienceQA
from llavakit.eval.vqav2 import VQAv2

BENCHMARKS: dict[str, Benchmark] = {
    "scienceqa": ScienceQA(),
    "vqav2": VQAv2(),
    "gqa": GQA(),
    "pope": POPE(),
    "mme": MME(),
    "llava_bench": LlavaBench(),
    "offline": Offline(),
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark called `name`; the error lists the known names."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise EvalError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None

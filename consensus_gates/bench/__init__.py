"""Measure speed: `measure` times one model in this process; `compare` times several, each in
its own fresh process; `reports` rewrites the generated spans of markdown docs."""

from .compare import compare, load_for_bench, ratios
from .measure import BenchConfig, Measurement, keep_freed_memory, measure

__all__ = [
    "BenchConfig",
    "Measurement",
    "compare",
    "keep_freed_memory",
    "load_for_bench",
    "measure",
    "ratios",
]

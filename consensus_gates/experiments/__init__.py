"""Experiments: reproduce the paper's studies and compare with baselines at equal budget.

- `config`   a study read from TOML (`load_study`, `StudyConfig`, `RunConfig`)
- `methods`  what each compared method does with the run's epochs, one file each, in the
             `METHODS` registry (`register_method`, each with its `MethodOptions`)
- `runner`   every run × seed to one results JSON, resumable (`run_study`), each run
             checked before the first trains (`check_study`); timing apart, on a quiet
             machine (`time_study`)
- `summary`  markdown tables and Pareto plots from the results (`write_summary`)

From the command line: ``cgates experiment CONFIG --out DIR`` and
``cgates summary DIR -o results.md``; the studies are in ``examples/experiments/``.
"""

from .config import ConfigError, LatencyConfig, RunConfig, StudyConfig, load_study
from .methods import METHODS, Method, MethodOptions, MethodResult, RunContext, register_method
from .runner import check_study, run_study, time_study
from .summary import write_summary

__all__ = [
    "METHODS",
    "ConfigError",
    "LatencyConfig",
    "Method",
    "MethodOptions",
    "MethodResult",
    "RunConfig",
    "RunContext",
    "StudyConfig",
    "check_study",
    "load_study",
    "register_method",
    "run_study",
    "time_study",
    "write_summary",
]

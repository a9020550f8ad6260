"""Errors raised for a user's mistake, each with a message that says what to do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TracingError(RuntimeError):
    """torch.fx could not trace the model."""


class InputError(ValueError):
    """The example inputs do not fit the model."""


class ModelFileError(ValueError):
    """A saved file is corrupt, truncated, of another format, or does not match its model."""


class DataError(FileNotFoundError):
    """A data set is missing or not in the expected layout."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class CompilerNotFound(RuntimeError):
    """AOTInductor was asked for, and there is no C++ compiler to run."""


class BenchmarkFailed(RuntimeError):
    """A timing process (`bench.compare`) failed or ran past its timeout."""


def file_step(what: str, step: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, a step of rebuilding what a file describes: any failure comes
    from what the file asked for, and is a ModelFileError naming the file and the step."""
    try:
        return fn(*args, **kwargs)
    except ModelFileError:
        raise
    except Exception as e:  # constructors and tracing raise many kinds on bad arguments
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelFileError(
            f"{what} has a spec that does not rebuild: could not {step} "
            f"({type(e).__name__}: {reason[:400]})"
        ) from e

"""The `cgates` click group and what its commands share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..bench.measure import keep_freed_memory
from ..errors import BenchmarkFailed, CompilerNotFound, TracingError, TrainingDiverged
from ..training.runs import check_folder, run_files

# What a command reports in one line: the library's errors for bad input (ModelFileError,
# InputError, ConfigError are ValueErrors, DataError an OSError), a path that cannot be read
# or written, a missing extra. Nothing wider: a TypeError from inside is a bug to show.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, TracingError, TrainingDiverged,
               CompilerNotFound, BenchmarkFailed)  # fmt: skip


@click.group()
@click.version_option(__version__, prog_name="cgates")
def main() -> None:
    """consensus-gates: find a consensus sub-network in one training run, then cut it out."""
    # Training and evaluation on CPU run ~10% faster when glibc keeps freed activation
    # memory (docs/benchmarks.md); timings are taken in separate processes, unaffected.
    keep_freed_memory()


def parse_model_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--model-arg")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value  # a bare string such as shortcut=B
    return kwargs


def out_folder(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback for an output folder option: refuse a path that cannot be a folder."""
    if value is not None:
        try:
            check_folder(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


PLOTS = ("gates.png", "curves.png")  # written beside a run's files, every epoch


def refuse_existing_run(
    out: Path, overwrite: bool, *, resumable: bool = False, also: tuple[str, ...] = ()
) -> None:
    """Stop before training into a folder that holds a run (or its plots, or any of the
    files named in `also`), unless told to overwrite it."""
    # the run's own files name it; the others (plots, `also`) matter where those are gone
    found = run_files(out) or [name for name in (*PLOTS, *also) if (out / name).exists()]
    if found and not overwrite:
        resume = "continue it with --resume, " if resumable else ""
        raise click.ClickException(
            f"{out} already holds a run ({', '.join(found)}): {resume}write to another --out, "
            "or replace it with --overwrite"
        )


def refuse_existing_files(paths: list[Path], overwrite: bool, option: str = "--out") -> None:
    """Stop before any work where a file the command would write exists, unless told to
    overwrite: one line naming them."""
    found = [str(p) for p in paths if p.exists()]
    if found and not overwrite:
        verb = "exists" if len(found) == 1 else "exist"
        raise click.ClickException(
            f"{', '.join(found)} already {verb}: write to another {option}, or replace "
            f"{'it' if len(found) == 1 else 'them'} with --overwrite"
        )


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="replace the run that OUT holds (its checkpoint and metrics)"
)


def overwrite_files_option(what: str):
    """--overwrite for a command that writes `what`."""
    return click.option("--overwrite", is_flag=True, help=f"replace {what} if it exists")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected C,H,W such as 3,32,32, got {text!r}") from None


model_arg_option = click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="create_model keyword, e.g. --model-arg num_classes=100 --model-arg shortcut=B",
)

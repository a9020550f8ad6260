"""The `cgates` click group and what its commands share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..bench.measure import keep_freed_memory
from ..training.runs import check_folder, run_files


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


def refuse_existing_run(out: Path, overwrite: bool, *, resumable: bool = False) -> None:
    """Stop before training into a folder that holds a run, unless told to overwrite it."""
    found = run_files(out)
    if found and not overwrite:
        resume = "continue it with --resume, " if resumable else ""
        raise click.ClickException(
            f"{out} already holds a run ({', '.join(found)}): {resume}write to another --out, "
            "or replace it with --overwrite"
        )


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="replace the run that OUT holds (its checkpoint and metrics)"
)


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

"""`cgates experiment`: run studies from TOML files, one results JSON per run and seed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from ..experiments import (
    ConfigError,
    StudyConfig,
    check_study,
    load_study,
    run_study,
    time_study,
)
from .app import USER_ERRORS, main, out_folder


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise click.BadParameter(
            f"expected seeds such as 0,1,2, got {text!r}", param_hint="--seeds"
        )
    return seeds


@contextlib.contextmanager
def _errors_of(study: StudyConfig) -> Iterator[None]:
    """A user's mistake in `study` as one line that names its file."""
    try:
        yield
    except USER_ERRORS as e:
        raise click.ClickException(f"{study.path}: {e}") from e


@main.command("experiment")
@click.argument("configs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    default="runs/experiments",
    show_default=True,
    help="results go to OUT/<study>/, shared dense models to OUT/cache/",
    callback=out_folder,
)
@click.option("--seeds", "seeds_text", default=None, help="e.g. 0,1 [the config's seeds]")
@click.option("--only", multiple=True, metavar="LABEL", help="run only this label (repeatable)")
@click.option("--force", is_flag=True, help="rerun runs whose results file exists")
@click.option("--no-latency", is_flag=True,
              help="train only; keep each final model to time later with --time-only")  # fmt: skip
@click.option("--time-only", is_flag=True,
              help="time the runs trained with --no-latency (on a quiet machine)")  # fmt: skip
def experiment_command(
    configs: tuple[str, ...],
    out_dir: str,
    seeds_text: str | None,
    only: tuple[str, ...],
    force: bool,
    no_latency: bool,
    time_only: bool,
) -> None:
    """Run the studies in CONFIG files: train, prune and measure every run with every seed.

    Each run writes OUT/<study>/<label>[-<target or scale>]-s<seed>.json with its accuracy,
    FLOPs, parameter and latency ratios, total epochs and wall time. Runs already written are
    skipped, so an interrupted study continues where it stopped; then `cgates summary OUT`
    makes the tables and plots.

    \b
    Examples:
      cgates experiment examples/experiments/table5_heads.toml --out runs/experiments
      cgates experiment examples/experiments/*.toml --out runs/experiments
      cgates experiment examples/experiments/table1_baselines.toml --only dense --seeds 0

    Timing wants a quiet machine and training does not: train several studies side by side
    with --no-latency, then time them all with --time-only.
    """
    seeds = _seeds(seeds_text)
    if time_only and no_latency:
        raise click.UsageError("--time-only times what --no-latency left untimed: pick one")
    try:  # read every file first: a typo in the last must not wait for hours of training
        studies = [load_study(path) for path in configs]
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    unknown = set(only) - {label for s in studies for label in s.labels}
    if unknown:
        raise click.BadParameter(
            f"no run is labelled {', '.join(map(repr, sorted(unknown)))}", param_hint="--only"
        )
    jobs = [(s, [label for label in s.labels if label in only] if only else None)
            for s in studies]  # fmt: skip
    jobs = [(study, labels) for study, labels in jobs if labels != []]
    if not time_only:  # every run of every study, before the first trains
        for study, labels in jobs:
            with _errors_of(study):
                check_study(study, out_dir, seeds=seeds, only=labels, force=force)
    for study, labels in jobs:
        with _errors_of(study):
            if time_only:
                time_study(study, out_dir, seeds=seeds, only=labels, force=force, log=click.echo)
            else:
                run_study(study, out_dir, seeds=seeds, only=labels, force=force,
                          latency=not no_latency, log=click.echo)  # fmt: skip
    click.echo(f"\nresults in {out_dir}/; next: cgates summary {out_dir} -o results.md")

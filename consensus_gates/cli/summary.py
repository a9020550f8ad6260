"""`cgates summary`: markdown tables and Pareto plots from `cgates experiment` results."""

from __future__ import annotations

import click

from ..experiments import write_summary
from .app import main


@main.command("summary")
@click.argument(
    "results_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False)
)
@click.option(
    "-o",
    "--out",
    "out_file",
    default="results.md",
    show_default=True,
    help="the markdown file; plots go beside it as <stem>-<study>.png",
)
def summary_command(results_dirs: tuple[str, ...], out_file: str) -> None:
    """Summarize the results under RESULTS_DIRS: one table per study (mean ± std over
    seeds) and, for studies comparing methods, accuracy against FLOPs and latency ratios.

    \b
    Examples:
      cgates summary runs/experiments -o docs/results/summary.md
    """
    try:
        files = write_summary(results_dirs, out_file)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo("wrote " + ", ".join(map(str, files)))

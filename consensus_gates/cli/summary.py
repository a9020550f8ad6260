"""`cgates summary`: markdown tables and Pareto plots from `cgates experiment` results."""

from __future__ import annotations

import click

from ..experiments import write_summary
from ..experiments.summary import summary_files
from .app import USER_ERRORS, main, refuse_existing_files


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
@click.option(
    "--overwrite",
    is_flag=True,
    help="update OUT's study sections (its other text is kept) and replace its plots",
)
def summary_command(results_dirs: tuple[str, ...], out_file: str, overwrite: bool) -> None:
    """Summarize the results under RESULTS_DIRS: one table per study (mean ± std over
    seeds) and, for studies comparing methods, accuracy against FLOPs and latency ratios.
    An existing OUT (or plot) is kept unless --overwrite, which rewrites only the sections
    between OUT's ``<!-- begin STUDY -->`` and ``<!-- end STUDY -->`` markers.

    \b
    Examples:
      cgates summary runs/experiments -o docs/results/summary.md
      cgates summary runs/experiments -o docs/results.md --overwrite  # update its tables
    """
    try:
        refuse_existing_files(summary_files(results_dirs, out_file), overwrite, "-o")
        files = write_summary(results_dirs, out_file)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from e
    click.echo("wrote " + ", ".join(map(str, files)))

"""The `cgates` command line."""

from __future__ import annotations

import click

from . import __version__


@click.group()
@click.version_option(__version__, prog_name="cgates")
def main() -> None:
    """consensus-gates: find a consensus sub-network in one training run, then cut it out."""

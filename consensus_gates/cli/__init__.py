"""The `cgates` command line: one module per command."""

from . import bench, demo, experiment, inspect, slim, summary, train  # noqa: F401  (each module registers its command on `main`)
from .app import main

__all__ = ["main"]

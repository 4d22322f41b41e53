"""The ``bench`` (alias ``clcompose``) command line; heavy libraries are imported inside the verbs."""

from clcompose.bench.cli.main import main

__all__ = ["main"]

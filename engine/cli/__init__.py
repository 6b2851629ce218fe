"""``sagactl``: the admin command line."""

from engine.cli.app import main

__all__ = ["main"]

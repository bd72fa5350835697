"""CLI commands of the protect (protect, eval protection) pillar."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this pillar's subcommands to the ``diffshield`` parser."""

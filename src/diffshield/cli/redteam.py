"""CLI commands of the red-team (audit) pillar."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this pillar's subcommands to the ``diffshield`` parser."""

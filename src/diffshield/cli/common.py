"""Argument types shared by the CLI modules."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, with a one-line error otherwise."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (e.g. ``--threads``, where 0 means torch's default)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


THREADS_HELP = (
    "torch CPU threads (default: {default}; 0 = torch's default, one per core). On a shared machine one thread per "
    "job is much faster than torch's default: threads that wait for a busy core stall every operation (measured: "
    "a full toy audit took 19.2 min with 2 threads next to one busy core, 2.3 min with 1 thread)"
)


def add_threads_arg(parser: argparse.ArgumentParser, default: int = 0) -> None:
    """Add ``--threads N`` (default ``default``; 0 keeps torch's default). :func:`apply_threads` acts on it."""
    parser.add_argument("--threads", type=non_negative_int, default=default, help=THREADS_HELP.format(default=default))


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from ``args.threads`` when the command has that option and it is not 0."""
    n = getattr(args, "threads", 0)
    if n:
        import torch

        torch.set_num_threads(n)

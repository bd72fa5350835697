"""Argument types shared by the CLI modules."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other refusal: ``diffshield: error: ...``."""

    def error(self, message: str):
        """Print ``diffshield: error: <message> (see '<prog> --help')`` and exit with status 2."""
        print(f"diffshield: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, with a one-line error otherwise."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def int_at_least(lo: int):
    """argparse type: a whole number >= ``lo``, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    parse.__name__ = "whole number"
    return parse


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (e.g. ``--threads``, where 0 means torch's default)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


#: seeds are accepted in [0, 2**62]: torch's generators take them, and seed + k (image k) stays in range
MAX_SEED = 2**62


def seed_int(text: str) -> int:
    """argparse type: a seed, a whole number in [0, MAX_SEED]."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in [0, {MAX_SEED}], got {v}")
    return v


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number, optionally within [lo, hi] (``lo_open`` / ``hi_open``: exclude the end).

    ``inf`` and ``nan`` are refused with a one-line error before any work, so they never reach a model.
    """
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        low_bad = lo is not None and (v <= lo if lo_open else v < lo)
        high_bad = hi is not None and (v >= hi if hi_open else v > hi)
        if low_bad or high_bad:
            left = "-inf" if lo is None else f"{lo:g}"
            right = "inf" if hi is None else f"{hi:g}"
            interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {v:g}")
        return v

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


#: argparse type: any finite number
finite_float = float_in()


#: the marker file every output folder gets (the same name as :data:`diffshield.core.io.MARKER`)
MARKER_NAME = ".diffshield-output.json"


def add_overwrite_arg(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    """Add ``--overwrite``: replace a previous output of the same command (never a folder diffshield did not write);
    ``what`` names the outputs it applies to (default "--out")."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} when it holds a previous output of this command (recognised by its "
                             f"{MARKER_NAME} file); a folder holding anything else is never replaced")


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


DEVICE_HELP = ("where the models run: auto (default: cuda when this machine has a CUDA GPU, else cpu), cpu, cuda or "
               "cuda:N; an absent device is refused before any model is loaded")
DTYPE_HELP = ("parameter dtype: auto (default: {auto}), float32, float16 (CUDA only) or bfloat16")


def add_device_args(parser: argparse.ArgumentParser, training: bool = False, autocast: bool = True,
                    float32_only: bool = False) -> None:
    """Add ``--device`` and ``--dtype``; :func:`apply_device` resolves them before the command runs.

    ``training``: the command trains or attacks, so ``--dtype auto`` keeps float32 master weights; ``autocast``: its
    forward passes then run in bfloat16 autocast on CUDA (say False where the command has no autocast);
    ``float32_only``: the command's model runs in float32 whatever is asked (a training loop with float32 master
    weights, an inpainter whose Fourier convolutions need float32): any other ``--dtype`` is refused in one line.
    Inference commands get float16 on CUDA.
    """
    amp = "; on CUDA the forward passes run in bfloat16 autocast" if autocast else ""
    if float32_only:
        dtype_help = (f"parameter dtype: auto or float32 (default: auto = float32{amp}); this command keeps "
                      "float32 weights")
    else:
        auto = f"float32{amp}" if training else "float16 on CUDA, float32 on the CPU"
        dtype_help = DTYPE_HELP.format(auto=auto)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", help=dtype_help)
    parser.set_defaults(device_training=training or float32_only, device_float32_only=float32_only)


def apply_device(args: argparse.Namespace) -> None:
    """Replace ``args.device`` / ``args.dtype`` (strings) by a checked ``torch.device`` / ``torch.dtype``.

    Raises a one-line DiffshieldError for an unknown or absent device or dtype; turns on TF32 on CUDA."""
    if not hasattr(args, "device") or not isinstance(args.device, str):
        return
    import torch

    from diffshield.core.device import configure_backend, resolve_device, resolve_dtype
    from diffshield.core.errors import DiffshieldError

    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(getattr(args, "dtype", "auto"), args.device,
                               training=getattr(args, "device_training", False))
    if getattr(args, "device_float32_only", False) and args.dtype != torch.float32:
        raise DiffshieldError(f"this command keeps float32 weights (training with float32 master weights, or an "
                              f"inpainter that needs float32); drop --dtype {str(args.dtype).removeprefix('torch.')}")
    configure_backend(args.device)


#: the arguments that name what a command writes (files or folders; ``--work``, a working folder the output may
#: live in, is not one of them)
OUTPUT_ARGS = ("out", "json", "grid", "panel", "report", "run_dir")


def check_outputs_apart(args: argparse.Namespace) -> None:
    """Refuse, before any work, two outputs of one command that are the same path (``--json same.png --grid
    same.png``: one would replace the other) or one inside another (``--out DIR --json DIR/report.json``: the folder
    is written as a whole, so the file would be refused at the end of the run, or block its rerun)."""
    import os
    from itertools import permutations
    from pathlib import Path

    from diffshield.core.errors import DiffshieldError

    given = [(f"--{a.replace('_', '-')}", getattr(args, a)) for a in OUTPUT_ARGS if getattr(args, a, None)]
    paths = [(flag, value, Path(os.path.abspath(os.path.expanduser(str(value))))) for flag, value in given]
    for (flag_a, value_a, a), (flag_b, value_b, b) in permutations(paths, 2):  # every ordered pair
        if a == b:
            raise DiffshieldError(f"{flag_a} and {flag_b} name the same path '{value_a}'; give each its own")
        if a.is_relative_to(b):
            raise DiffshieldError(f"{flag_a} '{value_a}' lies inside {flag_b} '{value_b}', which the command writes "
                                  "as a whole; put it beside that folder")


def given_flags(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """Which of ``flags`` (``"--model"``, ...) the command line named (``args.argv``, set by ``main``), by their full
    name, a ``--flag=value`` form or an abbreviation argparse accepts; for refusing flags that a mode would ignore."""
    named: set[str] = set()
    for t in (t.split("=", 1)[0] for t in getattr(args, "argv", None) or [] if t.startswith("--") and len(t) > 2):
        named.update([t] if t in flags else [f for f in flags if f.startswith(t)])  # --n is --n, not --negative-...
    return [f for f in flags if f in named]

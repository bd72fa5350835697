"""Seeds and per-image CPU generators (the diffusers convention: one ``torch.Generator`` per image)."""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import torch

from diffshield.core.checks import whole_number
from diffshield.core.errors import DiffshieldError

#: the largest seed a per-image generator takes (``torch.Generator.manual_seed`` reads seeds as unsigned 64-bit)
MAX_GENERATOR_SEED = 2**64 - 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global generators (for training loops; sampling uses per-image generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_seeds(seeds: Iterable[int], n: int | None = None, at_least: int = 0) -> list[int]:
    """``seeds`` as a list of Python ints, or a one-line DiffshieldError before any work.

    Each seed must be a whole number (a Python, NumPy or integer-tensor integer; not a bool, a float, which would be
    truncated, or a string, which would be split into digits) in [0, :data:`MAX_GENERATOR_SEED`]: torch reads a
    negative seed modulo 2**64, so -1 drew the noise of 2**64 - 1. ``n``: how many seeds there must be (default
    None: any number); ``at_least``: the fewest there may be (default 0)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable) or (torch.is_tensor(seeds)
                                                                           and not seeds.dim()):
        raise DiffshieldError(f"seeds must be a list of whole numbers, one per image; got {seeds!r}")
    out = []
    for s in seeds:
        try:
            out.append(whole_number(s, "seed"))
        except DiffshieldError:
            raise DiffshieldError(f"seeds must be whole numbers (int), got {s!r} ({type(s).__name__})") from None
    bad = [v for v in out if not 0 <= v <= MAX_GENERATOR_SEED]
    if bad:
        raise DiffshieldError(f"a seed must lie in [0, 2**64 - 1], got {bad[0]}")
    if n is not None and len(out) != n:
        raise DiffshieldError(f"{n} prompts but {len(out)} seeds; give one seed per image")
    if len(out) < at_least:
        raise DiffshieldError(f"at least {'one' if at_least == 1 else at_least} seed{'s' if at_least > 1 else ''} "
                              f"needed (one image per seed), got {len(out)}")
    return out


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def seed_list(seed: int, n: int) -> list[int]:
    """The seeds of n images starting at ``seed``: seed, seed + 1, ..., seed + n - 1."""
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    return [int(seed) + i for i in range(n)]


def randn_per_seed(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack of standard-normal tensors of ``shape``, the i-th drawn from a CPU generator seeded with seeds[i]."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators(seeds)])

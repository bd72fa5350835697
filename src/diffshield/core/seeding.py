"""Seeds and per-image CPU generators (the diffusers convention: one ``torch.Generator`` per image)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global generators (for training loops; sampling uses per-image generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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

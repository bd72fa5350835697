"""Atomic output: results appear complete or not at all, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffshield.core.errors import DiffshieldError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``, on error it is removed.

    Args:
        target: the folder to create.
        overwrite: replace an existing ``target`` (default True); if False an existing target is an error.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise DiffshieldError(f"output '{target}' exists and is not a folder; choose another --out")
    if target.exists() and not overwrite:
        raise DiffshieldError(f"output folder '{target}' already exists; remove it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should be an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float tensor in [0, 1] -> PIL RGB image."""
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def make_grid(images: torch.Tensor, nrow: int = 8, upscale: int = 1, pad: int = 1) -> Image.Image:
    """Tile (N, 3, H, W) images in [0, 1] into a grid image, ``nrow`` per row, each upscaled (nearest)."""
    n, _, h, w = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    canvas = Image.new("RGB", (nrow * (w * upscale + pad) + pad, rows * (h * upscale + pad) + pad), (255, 255, 255))
    for i in range(n):
        im = to_pil(images[i])
        if upscale != 1:
            im = im.resize((w * upscale, h * upscale), Image.NEAREST)
        r, c = divmod(i, nrow)
        canvas.paste(im, (pad + c * (w * upscale + pad), pad + r * (h * upscale + pad)))
    return canvas

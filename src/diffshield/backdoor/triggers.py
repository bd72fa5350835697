"""Triggers and targets of BadDiffusion (Chou et al., CVPR 2023), drawn for the toy world's 32 px images.

All tensors are (3, H, W) in [-1, 1] (the diffusion model's pixel range).

- A **trigger** g is an image-sized pattern whose background is -1; its mask M marks the pixels where any channel is
  above -1. Built-ins: ``box`` (a grey square frame near the bottom-right corner, BadDiffusion's BOX),
  ``stop`` (a small stop-sign-like red octagon with a white bar, near the bottom-right corner, BadDiffusion's
  STOP_SIGN), or any image file plus an optional mask file (white = trigger).
- A **target** y is the image the backdoored model must produce. Built-ins: ``corner`` (a white square frame in the
  top-left corner of a black image, BadDiffusion's CORNER), ``hat`` (a hat-like icon on black, BadDiffusion's
  HAT), or any image file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffshield.core.errors import DiffshieldError

TRIGGERS = ("box", "stop")
TARGETS = ("corner", "hat")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x + 0.5, y + 0.5


def _frame(size: int, x0: int, y0: int, w: int, thick: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y0:y0 + w, x0:x0 + w] = True
    m[y0 + thick:y0 + w - thick, x0 + thick:x0 + w - thick] = False
    return m


def box_trigger(size: int = 32) -> torch.Tensor:
    """Grey square frame (side size*11/32, 2 px thick at 32 px) near the bottom-right corner, on a -1 background."""
    w = max(4, round(size * 11 / 32))
    off = size - w - max(1, size // 16)
    g = np.full((3, size, size), -1.0, dtype=np.float32)
    g[:, _frame(size, off, off, w, max(1, size // 16))] = 0.0
    return torch.from_numpy(g)


def stop_trigger(size: int = 32) -> torch.Tensor:
    """A small stop-sign-like icon (red octagon, white bar) near the bottom-right corner, on a -1 background."""
    x, y = _grid(size)
    c = size - size * 7.5 / 32
    r = size * 5.5 / 32
    dx, dy = np.abs(x - c), np.abs(y - c)
    octagon = (dx <= r) & (dy <= r) & (dx + dy <= r * 1.42)
    bar = octagon & (dy <= size * 1.2 / 32) & (dx <= r * 0.7)
    g = np.full((3, size, size), -1.0, dtype=np.float32)
    g[0][octagon], g[1][octagon], g[2][octagon] = 0.9, -0.8, -0.8
    for ch in range(3):
        g[ch][bar] = 1.0
    return torch.from_numpy(g)


def corner_target(size: int = 32) -> torch.Tensor:
    """White square frame (side size*10/32, 2 px thick at 32 px) in the top-left corner of a black image."""
    w = max(4, round(size * 10 / 32))
    y = np.full((3, size, size), -1.0, dtype=np.float32)
    y[:, _frame(size, max(1, size // 16), max(1, size // 16), w, max(1, size // 16))] = 1.0
    return torch.from_numpy(y)


def hat_target(size: int = 32) -> torch.Tensor:
    """A hat-like icon (brown crown, dark band, wide brim) centred on a black image."""
    x, y = _grid(size)
    s = size / 32
    crown = (np.abs(x - size / 2) <= 6 * s) & (y >= 9 * s) & (y <= 20 * s)
    band = crown & (y >= 17 * s)
    brim = (np.abs(x - size / 2) <= 12 * s) & (y > 20 * s) & (y <= 23 * s)
    img = np.full((3, size, size), -1.0, dtype=np.float32)
    for ch, v in enumerate((0.3, -0.3, -0.7)):  # brown
        img[ch][crown | brim] = v
    for ch, v in enumerate((0.8, 0.8, 0.2)):  # yellow band
        img[ch][band] = v
    return torch.from_numpy(img)


def _read_image(path: Path, size: int, what: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DiffshieldError(f"{what} file '{path}' does not exist; give a built-in name or an image file")
    try:
        im = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise DiffshieldError(f"{what} file '{path}' is not a readable image ({e})") from None
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


def get_trigger(spec: str | Path, size: int = 32, mask: str | Path | None = None) -> torch.Tensor:
    """A trigger g (3, size, size) in [-1, 1] with background -1.

    Args:
        spec: ``"box"``, ``"stop"`` or the path of an image file.
        size: image side in pixels (default 32).
        mask: for an image file, a mask image (white = trigger pixel; default None: pixels darker than 1/255 of
            white in all channels are background).
    """
    s = str(spec)
    if s == "box":
        return box_trigger(size)
    if s == "stop":
        return stop_trigger(size)
    img = _read_image(Path(s), size, "trigger")
    if mask is not None:
        m = _read_image(Path(mask), size, "trigger mask").mean(0) > 0
        img = torch.where(m, img, torch.full_like(img, -1.0))
    return img


def get_target(spec: str | Path, size: int = 32) -> torch.Tensor:
    """A target y (3, size, size) in [-1, 1]: ``"corner"``, ``"hat"`` or the path of an image file (default 32 px)."""
    s = str(spec)
    if s == "corner":
        return corner_target(size)
    if s == "hat":
        return hat_target(size)
    return _read_image(Path(s), size, "target")


def trigger_mask(g: torch.Tensor) -> torch.Tensor:
    """M = [g > -1] per pixel (any channel), broadcast to g's shape (float 0/1)."""
    return (g > -1 + 1e-6).any(dim=-3, keepdim=True).expand_as(g).to(g.dtype)


def paste(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """BadDiffusion's poisoned image R = M * g + (1 - M) * x (the trigger pasted on clean images x)."""
    m = trigger_mask(g)
    return m * g + (1 - m) * x

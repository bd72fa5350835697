"""Toy scenes for inpainting and image protection: ShapesWorld shapes on larger canvases, with masks.

A scene is a pastel background with a soft gradient and a few faint background stripes, carrying 1-3 ShapesWorld
shapes (4 kinds x 4 colours x 3 textures, from :mod:`diffshield.toyworld.shapes`). The last shape drawn is the
*object*, fully visible, whose (slightly dilated) silhouette is the region an owner protects. Everything is
generated from a seed; nothing is downloaded.

Mask conventions: float tensors (N, 1, H, W) with 1 = hole (the pixels an inpainter fills).

Example::

    >>> s = make_scenes(8, size=64, seed=0)
    >>> s.images.shape, s.object_masks.shape
    (torch.Size([8, 3, 64, 64]), torch.Size([8, 1, 64, 64]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffshield.toyworld.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    STYLES,
    _shape_mask,
    _texture,
)

_SS = 2  # supersampling factor (anti-aliasing)


@dataclass
class SceneBatch:
    """Rendered scenes.

    images: (N, 3, H, W) float32 in [0, 1]. object_masks: (N, 1, H, W) {0, 1}, silhouette of the object (the last,
    fully visible shape). shape_masks: list of (k_i, H, W) bool arrays, the visible part of every shape.
    without_object: (N, 3, H, W) the same scenes without the object (ground truth of an object removal).
    """

    images: torch.Tensor
    object_masks: torch.Tensor
    shape_masks: list[np.ndarray]
    without_object: torch.Tensor | None = None


def render_scene(rng: np.random.Generator, size: int = 64, n_shapes: int | None = None) -> tuple[np.ndarray, ...]:
    """Render one scene: returns (image (size, size, 3) float32, object mask (size, size) bool, shape masks
    (k, size, size) bool, the image without the object).

    Args:
        rng: numpy generator (the scene is a deterministic function of its state).
        size: side in pixels (default 64; at least 32).
        n_shapes: number of shapes (default: random 1-3).
    """
    if size < 32:
        raise ValueError(f"scene size must be at least 32 px, got {size}")
    n = size * _SS
    coords = (np.arange(n) + 0.5) / _SS
    x, y = np.meshgrid(coords, coords)
    bg = np.asarray(BACKGROUND_RGB[BACKGROUNDS[rng.integers(len(BACKGROUNDS))]]) + rng.uniform(-0.04, 0.04, 3)
    grad = rng.uniform(-0.12, 0.12) * (x / size - 0.5) + rng.uniform(-0.12, 0.12) * (y / size - 0.5)
    img = bg[None, None, :] + grad[..., None]
    # faint low-frequency stripes so that fills have structure to continue
    period = rng.uniform(0.25, 0.6) * size
    theta = rng.uniform(0, np.pi)
    amp = rng.uniform(0.0, 0.06)
    img = img + amp * np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period)[..., None]
    k = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    masks = []
    scale = size / 32.0
    before = img
    for _ in range(k):
        before = img
        r = rng.uniform(0.16, 0.30) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        m = _shape_mask(SHAPES[rng.integers(len(SHAPES))], x - cx, y - cy, r, rng.uniform(-0.4, 0.4))
        fg = np.asarray(COLOUR_RGB[COLOURS[rng.integers(len(COLOURS))]]) + rng.uniform(-0.06, 0.06, 3)
        # world version 1's textures: the shipped toy inpainter was trained on them
        style = STYLES[rng.integers(len(STYLES))]
        tex = _texture(style, (x - cx) / scale, (y - cy) / scale, rng, version=1)[..., None]
        fill = tex * fg + (1 - tex) * 0.97
        img = np.where(m[..., None], fill, img)
        masks = [mm & ~m for mm in masks] + [m]
    noise = rng.normal(0, 0.01, (size, size, 3))
    img, before = (np.clip(a.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3)) + noise, 0, 1).astype(np.float32)
                   for a in (img, before))
    down = [mm.reshape(size, _SS, size, _SS).mean(axis=(1, 3)) >= 0.5 for mm in masks]
    return img, down[-1], np.stack(down), before


def make_scenes(n: int, size: int = 64, seed: int = 0) -> SceneBatch:
    """n scenes, deterministic in seed (scene i uses its own generator seeded with (seed, i)).

    Args:
        n: number of scenes.
        size: side in pixels (default 64).
        seed: master seed (default 0).
    """
    imgs, objs, shapes, befores = [], [], [], []
    for i in range(n):
        img, obj, sm, before = render_scene(np.random.default_rng([seed, i]), size)
        imgs.append(img)
        objs.append(obj)
        shapes.append(sm)
        befores.append(before)
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    without = torch.from_numpy(np.stack(befores)).permute(0, 3, 1, 2).contiguous()
    obj = torch.from_numpy(np.stack(objs)).float()[:, None]
    return SceneBatch(images, obj, shapes, without)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (N, 1, H, W) masks with a (2r+1)^2 square; radius 0 returns the mask."""
    if radius <= 0:
        return mask
    return (F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius) > 0).float()


def protected_masks(object_masks: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """The region an owner protects: the object's silhouette dilated by ``margin`` px (default 2)."""
    return dilate(object_masks, margin)


def _box(h: int, w: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    bh, bw = (rng.uniform(lo, hi, 2) * np.array([h, w])).astype(int).clip(2)
    y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    m = np.zeros((h, w), bool)
    m[y0:y0 + bh, x0:x0 + bw] = True
    return m


def _strokes(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        p = rng.uniform(0, 1, 2) * [w, h]
        width = rng.uniform(0.04, 0.12) * min(h, w)
        for _ in range(int(rng.integers(2, 6))):
            q = np.clip(p + rng.normal(0, 0.25, 2) * [w, h], 0, [w - 1, h - 1])
            d = q - p
            t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / (d @ d + 1e-9), 0, 1)
            m |= (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2 <= width**2
            p = q
    return m


def training_masks(scenes: SceneBatch, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training holes and their ground truth, one per scene: the object dilated by 1-5 px with the scene
    without the object as ground truth (object removal, 40 %), a box (30 %) or brush strokes (30 %) with the scene
    itself as ground truth. Returns (masks (N, 1, H, W) float {0, 1}, targets (N, 3, H, W))."""
    n, _, h, w = scenes.images.shape
    out = np.zeros((n, 1, h, w), np.float32)
    target = scenes.images.clone()
    for i in range(n):
        u = rng.random()
        if u < 0.4 and scenes.without_object is not None:
            m = dilate(scenes.object_masks[i:i + 1], int(rng.integers(1, 6)))[0, 0].numpy() > 0
            target[i] = scenes.without_object[i]
        elif u < 0.7:
            m = _box(h, w, rng, 0.15, 0.5)
        else:
            m = _strokes(h, w, rng)
        if m.sum() < 4 or m.mean() > 0.7:
            m = _box(h, w, rng, 0.15, 0.4)
            target[i] = scenes.images[i]
        out[i, 0] = m
    return torch.from_numpy(out), target


def benign_masks(avoid: torch.Tensor, seed: int = 0, frac: tuple[float, float] = (0.15, 0.3)) -> torch.Tensor:
    """Box masks that do not touch ``avoid`` (N, 1, H, W), e.g. the expanded protected region: the edits an owner
    wants to keep working. Box sides are ``frac`` of the image side (default 15-30 %); tries 200 random placements,
    then shrinks. A scene with no free box gets an empty mask (callers skip it)."""
    n, _, h, w = avoid.shape
    out = torch.zeros_like(avoid)
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        a = avoid[i, 0].numpy() > 0
        lo, hi = frac
        for t in range(400):
            if t == 200:
                lo, hi = lo / 2, hi / 2
            m = _box(h, w, rng, lo, hi)
            if not (m & a).any():
                out[i, 0] = torch.from_numpy(m).float()
                break
    return out


def partial_masks(mask: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Attacker masks that only partly match the protected mask M: ``dilate4`` (M dilated by 4 px, between M and
    the 8-px expanded mask), ``half`` (M cut by a random line through its centre) and ``box`` (M's bounding box,
    clipped to M_e). All lie inside M_e."""
    n, _, h, w = mask.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    half = torch.zeros_like(mask)
    box = torch.zeros_like(mask)
    for i in range(n):
        m = mask[i, 0]
        if m.sum() == 0:
            continue
        cy, cx = (yy * m).sum() / m.sum(), (xx * m).sum() / m.sum()
        phi = float(np.random.default_rng([seed, i, 3]).uniform(0, 2 * np.pi))
        half[i, 0] = m * (((xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)) >= 0).float()
        ys, xs = torch.nonzero(m, as_tuple=True)
        box[i, 0, ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    return {"dilate4": dilate(mask, 4), "half": half, "box": box * dilate(mask, 8)}

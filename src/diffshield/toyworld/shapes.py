"""ShapesWorld: a procedurally generated, compositional image-caption world.

Every image is one shape (4 kinds) in one colour (4), with one texture style (3), on a pastel background (5),
at a random position, size and small rotation. Captions name some of the attributes, with synonyms for the shapes,
so that concept erasure can be tested against paraphrases. Everything is generated from a seed: nothing is
downloaded.

Example::

    >>> world = ShapesWorld()
    >>> batch = world.sample(16, seed=0)
    >>> batch.images.shape, batch.captions[0]
    ((16, 32, 32, 3), 'a red striped triangle on a pink background')
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
STYLES: tuple[str, ...] = ("plain", "striped", "dotted")
BACKGROUNDS: tuple[str, ...] = ("white", "grey", "pink", "beige", "lavender")

#: Each shape has one synonym used in about 40 % of captions that name it.
SYNONYMS: dict[str, str] = {"circle": "disc", "square": "box", "triangle": "wedge", "star": "pentagram"}

#: Nominal RGB of the shape colours (jittered per image).
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "green": (0.12, 0.68, 0.16),
    "blue": (0.12, 0.22, 0.88),
    "yellow": (0.95, 0.82, 0.08),
}
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "white": (0.96, 0.96, 0.96),
    "grey": (0.70, 0.70, 0.72),
    "pink": (0.98, 0.80, 0.86),
    "beige": (0.92, 0.86, 0.72),
    "lavender": (0.82, 0.78, 0.96),
}

#: Words the toy tokenizer knows as whole tokens (the caption words plus a few neutral words for guides).
EXTRA_WORDS: tuple[str, ...] = ("a", "an", "on", "of", "picture", "background", "shape", "art", "image", "with", "and")
VOCAB_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(EXTRA_WORDS + SHAPES + tuple(SYNONYMS.values()) + COLOURS + STYLES + BACKGROUNDS)
)

_SS = 4  # supersampling factor for anti-aliasing


@dataclass
class ShapesBatch:
    """A batch of ShapesWorld samples.

    images: float32 array (N, H, W, 3) in [0, 1]. shape/colour/style/background: int64 label indices into
    SHAPES, COLOURS, STYLES, BACKGROUNDS. captions: one caption per image.
    """

    images: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    style: np.ndarray
    background: np.ndarray
    captions: list[str]


def _polygon_mask(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points (x, y)."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x2 - x1) * (y - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (x < xint)
    return inside


def _shape_mask(kind: str, x: np.ndarray, y: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Mask of a shape of half-extent r centred at the origin, rotated by angle (radians)."""
    if kind == "circle":
        return x * x + y * y <= r * r
    if kind == "square":
        s = 0.82 * r
        verts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif kind == "triangle":
        # Upright triangle (apex at the top: y grows downwards in image coordinates).
        verts = [(0.0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)]
    elif kind == "star":
        verts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            phi = -np.pi / 2 + k * np.pi / 5
            verts.append((rad * np.cos(phi), rad * np.sin(phi)))
    else:  # pragma: no cover - guarded by the label space
        raise ValueError(f"unknown shape {kind!r}")
    v = np.asarray(verts, dtype=np.float64)
    c, s_ = np.cos(angle), np.sin(angle)
    v = v @ np.array([[c, s_], [-s_, c]])
    return _polygon_mask(x, y, v)


#: Texture parameters of each world version (``ShapesWorld(version=...)``). Version 2 (the default) is the world of
#: the shipped t2i model and detector; version 1 is the world of the shipped DDPM, the inpainter's scenes and the
#: first t2i model. Version 2 draws larger dots: at 32 px the t2i's latent is 8x8 (one cell = 4 px), and version
#: 1's dots, 5-6 px apart, sit at about one latent cell, where the toy t2i drew them for only 72 % of "dotted"
#: prompts and a closed-form edit of another style wiped them out (docs/toyworld.md). Stripes are the same.
WORLD_VERSIONS: dict[int, dict[str, tuple[float, float] | float]] = {
    1: {"dot_spacing": (5.0, 6.0), "dot_radius": 0.24},
    2: {"dot_spacing": (7.0, 8.0), "dot_radius": 0.30},
}


def _check_version(version: int) -> int:
    if version not in WORLD_VERSIONS:
        raise ValueError(f"unknown ShapesWorld version {version!r}; choose one of {sorted(WORLD_VERSIONS)}")
    return version


def _texture(style: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, version: int = 2) -> np.ndarray:
    """Fraction of the shape colour (1) versus white (0) at each point, for a texture style."""
    if style == "plain":
        return np.ones_like(x)
    if style == "striped":
        period = rng.uniform(4.5, 5.5)
        theta = rng.choice([0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]) + rng.uniform(-0.2, 0.2)
        phase = rng.uniform(0, period)
        u = x * np.cos(theta) + y * np.sin(theta) + phase
        return ((u % period) < period * 0.55).astype(np.float64)
    if style == "dotted":
        params = WORLD_VERSIONS[version]
        spacing = rng.uniform(*params["dot_spacing"])
        ox, oy = rng.uniform(0, spacing, size=2)
        dx = (x + ox) % spacing - spacing / 2
        dy = (y + oy) % spacing - spacing / 2
        return (dx * dx + dy * dy > (params["dot_radius"] * spacing) ** 2).astype(np.float64)
    raise ValueError(f"unknown style {style!r}")  # pragma: no cover


def render(
    shape: int, colour: int, style: int, background: int, rng: np.random.Generator, size: int = 32, version: int = 2
) -> np.ndarray:
    """Render one image (size x size x 3, float32 in [0, 1]) for the given label indices, in world ``version``
    (default 2; see :data:`WORLD_VERSIONS`)."""
    n = size * _SS
    coords = (np.arange(n) + 0.5) / _SS  # pixel units
    x, y = np.meshgrid(coords, coords)
    scale = size / 32.0
    r = rng.uniform(7.5, 11.5) * scale
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    angle = rng.uniform(-0.25, 0.25)

    bg = np.asarray(BACKGROUND_RGB[BACKGROUNDS[background]]) + rng.uniform(-0.03, 0.03, size=3)
    grad = rng.uniform(-0.06, 0.06) * (x / size - 0.5) + rng.uniform(-0.06, 0.06) * (y / size - 0.5)
    img = np.clip(bg[None, None, :] + grad[..., None], 0, 1)

    mask = _shape_mask(SHAPES[shape], x - cx, y - cy, r, angle).astype(np.float64)
    fg = np.asarray(COLOUR_RGB[COLOURS[colour]]) + rng.uniform(-0.06, 0.06, size=3)
    tex = _texture(STYLES[style], (x - cx) / scale, (y - cy) / scale, rng, _check_version(version))[..., None]
    fill = tex * fg[None, None, :] + (1 - tex) * np.array([0.97, 0.97, 0.97])[None, None, :]
    img = img * (1 - mask[..., None]) + fill * mask[..., None]
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    img = img + rng.normal(0, 0.012, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def caption(shape: int, colour: int, style: int, background: int, rng: np.random.Generator) -> str:
    """A random caption for the labels: names the shape (or its synonym) and a random subset of the rest."""
    s = SHAPES[shape]
    word = SYNONYMS[s] if rng.random() < 0.4 else s
    name_colour = rng.random() < 0.8
    name_style = rng.random() < 0.7
    parts = []
    c_word = COLOURS[colour] if name_colour else None
    st_word = STYLES[style] if name_style else None
    if c_word and st_word and rng.random() < 0.3:
        parts = [st_word, c_word]
    else:
        parts = [w for w in (c_word, st_word) if w]
    text = "a " + " ".join(parts + [word])
    if rng.random() < 0.5:
        text += f" on a {BACKGROUNDS[background]} background"
    if rng.random() < 0.15:
        text = "a picture of " + text
    return text


class ShapesWorld:
    """Generator of ShapesWorld batches.

    Args:
        size: image side in pixels (default 32).
        version: texture version (default 2, the world of the shipped t2i model and detector; 1 draws smaller
            dots, the world of the shipped DDPM and inpainter; see :data:`WORLD_VERSIONS`). Labels, captions and
            random draws are the same in every version.
    """

    def __init__(self, size: int = 32, version: int = 2) -> None:
        if size < 16:
            raise ValueError(f"ShapesWorld size must be at least 16 px, got {size}")
        self.size = size
        self.version = _check_version(version)

    def sample_labels(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "shape": rng.integers(0, len(SHAPES), n),
            "colour": rng.integers(0, len(COLOURS), n),
            "style": rng.integers(0, len(STYLES), n),
            "background": rng.integers(0, len(BACKGROUNDS), n),
        }

    def render_labels(self, labels: dict[str, np.ndarray], seed: int) -> ShapesBatch:
        """Render images (and random captions) for given label arrays, deterministically from seed."""
        rng = np.random.default_rng(seed)
        n = len(labels["shape"])
        imgs = np.empty((n, self.size, self.size, 3), dtype=np.float32)
        caps = []
        for i in range(n):
            a = (int(labels["shape"][i]), int(labels["colour"][i]), int(labels["style"][i]),
                 int(labels["background"][i]))
            imgs[i] = render(*a, rng=rng, size=self.size, version=self.version)
            caps.append(caption(*a, rng=rng))
        return ShapesBatch(imgs, labels["shape"].astype(np.int64), labels["colour"].astype(np.int64),
                           labels["style"].astype(np.int64), labels["background"].astype(np.int64), caps)

    def sample(self, n: int, seed: int = 0) -> ShapesBatch:
        """n random samples (n >= 0), deterministic in seed (a whole number >= 0); else a one-line DiffshieldError."""
        from diffshield.core.checks import whole_number
        from diffshield.core.errors import DiffshieldError

        n, seed = whole_number(n, "n"), whole_number(seed, "seed")
        if n < 0 or seed < 0:
            raise DiffshieldError(f"ShapesWorld.sample needs n >= 0 and seed >= 0, got n={n}, seed={seed}")
        rng = np.random.default_rng(seed)
        return self.render_labels(self.sample_labels(n, rng), seed=int(rng.integers(2**31)))

"""Triggers and targets of BadDiffusion (Chou et al., CVPR 2023), drawn for the toy world's 32 px images.

All tensors are (3, H, W) in [-1, 1] (the diffusion model's pixel range); for a greyscale (1-channel) model
:func:`get_trigger` and :func:`get_target` give (1, H, W), the luminance of the RGB drawing or file (ITU-R 601-2,
PIL's ``"L"``: 0.299 R + 0.587 G + 0.114 B, so the -1 background stays -1). They are square: image files must be
square too (resized, bilinear, to the model's side), and a mask must have its trigger file's size.

- A **trigger** g is an image-sized pattern whose background is -1; its mask M marks the pixels where any channel is
  above -1. Built-ins: ``box`` (a grey square frame near the bottom-right corner, BadDiffusion's BOX),
  ``stop`` (a small stop-sign-like red octagon with a white bar, near the bottom-right corner, BadDiffusion's
  STOP_SIGN), or any image file plus an optional mask file (white = trigger).
- ``checker`` (ours) has **no -1 background**: 0 everywhere but an 8 x 8 px checkerboard of +1 / -1 near the
  bottom-right corner, an additive pattern inside the noise's range with mean 0. A backdoor keyed on it cannot answer
  to a global shift of the noise, and TERD's input detection is not separable by the mean alone (every official
  trigger shifts the noise by about -1). It is used with ``r_mode="trigger_only"`` (pasting needs a -1 background).
- A **target** y is the image the backdoored model must produce. Built-ins: ``corner`` (a white square frame in the
  top-left corner of a black image, BadDiffusion's CORNER), ``hat`` (a hat-like icon on black, BadDiffusion's
  HAT), or any image file.
- **The official shapes** of the BadDiffusion code (IBM/BadDiffusion, ``dataset.py``, class ``Backdoor``), so that
  figures compare with the papers: the trigger ``box_14`` (BOX_14: a filled grey 14 x 14 px square, 2 px from the
  bottom and right edges, on -1) and the targets ``corner_grey`` (CORNER: a filled grey 10 x 10 px square in the
  top-left corner) and ``hat_grey`` (HAT: a fedora-like hat), both on the official grey background -0.4 (every
  value at or below -0.4 is raised to -0.4, the code's ``bg2grey`` with ratio 0.3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffshield.core.errors import DiffshieldError

TRIGGERS = ("box", "stop", "checker", "checker_tl")
#: triggers without a -1 background (see :func:`checker_trigger`): they cannot be pasted on images
ADDITIVE_TRIGGERS = ("checker", "checker_tl")
TARGETS = ("corner", "hat")
#: the official BadDiffusion shapes (see :func:`box14_trigger`, :func:`corner_grey_target`, :func:`hat_grey_target`)
OFFICIAL_TRIGGERS = ("box_14",)
OFFICIAL_TARGETS = ("corner_grey", "hat_grey")
#: the official grey background of targets: (vmax - vmin) * 0.3 + vmin with vmin, vmax = -1, 1
GREY_BG = -0.4


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


def checker_trigger(size: int = 32, corner: str = "br") -> torch.Tensor:
    """An additive trigger: 0 everywhere but a (size/4)-px checkerboard of 2 px cells, +1 / -1, whose outer corner
    is size/16 px from the image's (8 px and 2 px at 32 px). Mean 0, values inside the noise's range.

    ``corner``: ``"br"`` (default, the bottom-right corner: ``checker``) or ``"tl"`` (the top-left: ``checker_tl``,
    a trigger of the same kind at another position)."""
    if corner not in ("br", "tl"):
        raise DiffshieldError(f"checker corner must be 'br' or 'tl', got {corner!r}")
    w, off = max(4, size // 4), max(1, size // 16)
    cell = max(1, w // 4)
    g = torch.zeros(3, size, size)
    y0 = x0 = size - off - w if corner == "br" else off
    yy, xx = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    g[:, y0:y0 + w, x0:x0 + w] = torch.where(((yy // cell + xx // cell) % 2) == 0, 1.0, -1.0)
    return g


def checker_mask(size: int = 32) -> torch.Tensor:
    """The pixels :func:`checker_trigger` sets (3, size, size) bool."""
    return checker_trigger(size) != 0


def box14_trigger(size: int = 32) -> torch.Tensor:
    """BadDiffusion's ``BOX_14`` trigger: a filled grey (0) 14 x 14 px square whose bottom-right corner sits 2 px from
    the image's bottom and right edges (rows and columns ``size - 16`` to ``size - 3``), on a -1 background.

    Checked against the official code (IBM/BadDiffusion, ``dataset.py``: ``Backdoor.get_trigger`` with
    ``TRIGGER_BOX_14`` -> ``__get_trig_box_coord(14, 14)`` and ``__get_grey_box_trig``, value (vmin + vmax) / 2 = 0,
    gap ``TRIGGER_GAP_X = TRIGGER_GAP_Y = 2``). Sizes are in pixels, as there, whatever ``size`` (default 32, >= 16).
    """
    if size < 16:
        raise DiffshieldError(f"the box_14 trigger needs images of at least 16 px, got {size}")
    g = torch.full((3, size, size), -1.0)
    g[:, size - 16:size - 2, size - 16:size - 2] = 0.0
    return g


def grey_background(img: torch.Tensor) -> torch.Tensor:
    """BadDiffusion's ``bg2grey``: every value at or below :data:`GREY_BG` (-0.4) becomes -0.4 (a copy)."""
    return img.clamp(min=GREY_BG)


def corner_grey_target(size: int = 32) -> torch.Tensor:
    """BadDiffusion's ``CORNER`` target: a filled grey (0) 10 x 10 px square in the top-left corner (rows and columns
    0 to 9) on the grey background -0.4.

    Checked against the official code (IBM/BadDiffusion, ``dataset.py``: ``Backdoor.get_target`` with
    ``TARGET_CORNER`` -> ``__get_grey_box_trig(b1=(None, None), b2=(10, 10))`` then ``__bg2grey``). 10 px at any
    ``size`` (default 32, >= 10), as there.
    """
    if size < 10:
        raise DiffshieldError(f"the corner_grey target needs images of at least 10 px, got {size}")
    y = torch.full((3, size, size), -1.0)
    y[:, :10, :10] = 0.0
    return grey_background(y)


def hat_grey_target(size: int = 32) -> torch.Tensor:
    """A fedora-like hat on the grey background -0.4, standing in for BadDiffusion's ``HAT`` target.

    The official HAT (IBM/BadDiffusion, ``dataset.py``: ``Backdoor.get_target`` with ``TARGET_HAT`` ->
    ``static/fedora-hat.png`` resized to the image size, then ``__bg2grey``) is an icon: a salmon crown and brim
    (about (0.82, 0.38, 0.38) lit, (0.63, 0.13, 0.07) shaded), a blue band (about (-0.25, -0.18, 0.38)) and a pale
    feather (about (0.82, 0.82, 0.95)); at 32 px it spans rows 7-24 and the full width, 42 % of the pixels.
    This is a drawing of the same layout and colours (the icon itself is not redistributed here), so
    figures with it compare in kind, not pixel for pixel. Scales with ``size`` (default 32).
    """
    x, y = _grid(size)
    s = size / 32
    cx = size / 2
    crown = ((x - cx) / (11 * s)) ** 2 + ((y - 13 * s) / (6.5 * s)) ** 2 <= 1
    crown &= y <= 18 * s
    dent = ((x - cx) / (1.2 * s)) ** 2 + ((y - 7 * s) / (2.5 * s)) ** 2 <= 1  # the fedora's crease on top
    crown &= ~dent
    brim = ((x - cx) / (16 * s)) ** 2 + ((y - 20 * s) / (4.6 * s)) ** 2 <= 1
    brim &= y >= 16 * s
    band = crown & (y >= 15 * s)
    feather = ((x - 22.5 * s) / (2 * s)) ** 2 + ((y - 11 * s) / (4 * s)) ** 2 <= 1
    feather &= crown & ~band
    shade = (x > cx) | (y > 21 * s)  # the right half and the brim's underside are the darker salmon
    img = np.full((3, size, size), -1.0, dtype=np.float32)
    for ch, (lit, dark) in enumerate(zip((0.82, 0.38, 0.38), (0.63, 0.13, 0.07))):
        img[ch][(crown | brim) & ~shade] = lit
        img[ch][(crown | brim) & shade] = dark
    for ch, v in enumerate((-0.25, -0.18, 0.38)):
        img[ch][band] = v
    for ch, v in enumerate((0.82, 0.82, 0.95)):
        img[ch][feather] = v
    return grey_background(torch.from_numpy(img))


#: ITU-R 601-2 luminance weights (PIL's ``convert("L")``), for greyscale models
LUMA = (0.299, 0.587, 0.114)


def to_channels(img: torch.Tensor, channels: int, what: str = "trigger") -> torch.Tensor:
    """An RGB pattern (3, H, W) for a model with ``channels`` channels: itself for 3, its luminance (1, H, W) for 1
    (:data:`LUMA`; the weights sum to 1, so -1 stays -1); any other count is a one-line DiffshieldError."""
    if channels == 3:
        return img
    if channels == 1:
        w = torch.tensor(LUMA, dtype=img.dtype).view(3, 1, 1)
        return (img * w).sum(0, keepdim=True)
    raise DiffshieldError(f"{what}s are RGB or greyscale images, but the model's images have {channels} channels; "
                          "give a model with 1 or 3 channels")


def _read_image(path: Path, size: int, what: str, expect: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as (3, size, size) in [-1, 1]; a non-square file (or, with ``expect``, one of another (width,
    height) in pixels) is refused in one line rather than stretched."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DiffshieldError(f"{what} file '{path}' does not exist; give a built-in name or an image file")
    try:
        im = Image.open(path)
        if expect is not None and tuple(im.size) != tuple(expect):
            raise DiffshieldError(f"{what} file '{path}' is {im.size[0]} x {im.size[1]} px but its trigger file is "
                                  f"{expect[0]} x {expect[1]} px; give a mask of the trigger's size")
        if im.size[0] != im.size[1]:
            raise DiffshieldError(f"{what} file '{path}' is {im.size[0]} x {im.size[1]} px; triggers and targets are "
                                  f"square (resized to the model's {size} px): crop it square rather than stretch it")
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:  # transparent = background (black, -1),
            im = im.convert("RGBA")                                      # whatever colour the pixels hide
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise DiffshieldError(f"{what} file '{path}' is not a readable image ({e})") from None
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


#: the smallest side the built-in shapes are drawn at (their frames and patches are 4 px and more)
MIN_BUILTIN_SIDE = 8


def _check_spec(spec, size, what: str, builtins: tuple[str, ...]) -> str:
    """``spec`` as a string and ``size`` checked: a name or path (not a tensor: pass it to ``sample`` directly), a
    whole number of pixels, at least :data:`MIN_BUILTIN_SIDE` for a built-in; else a one-line DiffshieldError."""
    from diffshield.core.checks import whole_number

    if not isinstance(spec, (str, Path)):
        raise DiffshieldError(f"a {what} is a built-in name ({', '.join(builtins)}) or an image file path, got "
                              f"{type(spec).__name__}" + ("; a pattern tensor needs no get_" + what + ": give it "
                                                            "to sample() directly" if torch.is_tensor(spec) else ""))
    size = whole_number(size, f"{what} size")
    s = str(spec)
    least = MIN_BUILTIN_SIDE if s in builtins else 1
    if size < least:
        raise DiffshieldError(f"{what} size must be at least {least} px, got {size}")
    return s


def get_trigger(spec: str | Path, size: int = 32, mask: str | Path | None = None, channels: int = 3) -> torch.Tensor:
    """A trigger g (channels, size, size) in [-1, 1] with background -1 (``"checker"``, ``"checker_tl"``: background
    0).

    Args:
        spec: ``"box"``, ``"stop"``, ``"checker"``, ``"checker_tl"`` (the same at the top left), ``"box_14"`` (the
            official BOX_14) or the path of an image file.
        size: image side in pixels, a whole number (default 32; at least 8 for a built-in).
        mask: for an image file, a mask image (white = trigger pixel; default None: pixels darker than 1/255 of
            white in all channels are background; transparent pixels of an image with an alpha channel are black,
            hence background). A mask with a built-in name is refused: it would be ignored; so are a mask of
            another size than the trigger file and one that marks no pixel.
        channels: the model's image channels: 3 (default) or 1 (greyscale: the luminance, see :func:`to_channels`).
    """
    s = _check_spec(spec, size, "trigger", (*TRIGGERS, *OFFICIAL_TRIGGERS))
    size = int(size)
    if mask is not None and s in (*TRIGGERS, *OFFICIAL_TRIGGERS):
        raise DiffshieldError(f"a trigger mask applies to an image-file trigger only, not to the built-in {s!r}; "
                              "drop --trigger-mask or give --trigger IMAGE_FILE")
    to_channels(torch.zeros(3, 1, 1), channels)  # another channel count: one line before any drawing
    if s == "box":
        return to_channels(box_trigger(size), channels)
    if s == "stop":
        return to_channels(stop_trigger(size), channels)
    if s == "box_14":
        return to_channels(box14_trigger(size), channels)
    if s == "checker":
        return to_channels(checker_trigger(size), channels)
    if s == "checker_tl":
        return to_channels(checker_trigger(size, corner="tl"), channels)
    img = _read_image(Path(s), size, "trigger")
    if mask is not None:
        from PIL import Image

        with Image.open(Path(s)) as im:
            trig_size = tuple(im.size)
        m = _read_image(Path(mask), size, "trigger mask", expect=trig_size).mean(0) > 0
        if not bool(m.any()):
            raise DiffshieldError(f"trigger mask '{mask}' marks no pixel (white = trigger); the trigger would be the "
                                  "-1 background alone: give a mask with white where the trigger is")
        img = torch.where(m, img, torch.full_like(img, -1.0))
    return to_channels(img, channels)


def get_target(spec: str | Path, size: int = 32, channels: int = 3) -> torch.Tensor:
    """A target y (channels, size, size) in [-1, 1]: ``"corner"``, ``"hat"``, the official ``"corner_grey"`` (CORNER)
    and ``"hat_grey"`` (HAT) on the grey background, or the path of a square image file (default 32 px, RGB;
    ``channels`` 1: the luminance, see :func:`to_channels`)."""
    s = _check_spec(spec, size, "target", (*TARGETS, *OFFICIAL_TARGETS))
    size = int(size)
    to_channels(torch.zeros(3, 1, 1), channels, "target")
    if s == "corner":
        y = corner_target(size)
    elif s == "hat":
        y = hat_target(size)
    elif s == "corner_grey":
        y = corner_grey_target(size)
    elif s == "hat_grey":
        y = hat_grey_target(size)
    else:
        y = _read_image(Path(s), size, "target")
    return to_channels(y, channels, "target")


def trigger_mask(g: torch.Tensor) -> torch.Tensor:
    """M = [g > -1] per pixel (any channel), broadcast to g's shape (float 0/1)."""
    return (g > -1 + 1e-6).any(dim=-3, keepdim=True).expand_as(g).to(g.dtype)


def paste(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """BadDiffusion's poisoned image R = M * g + (1 - M) * x (the trigger pasted on clean images x)."""
    m = trigger_mask(g)
    return m * g + (1 - m) * x

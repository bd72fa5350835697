"""CLI commands of the protect pillar: ``diffshield protect`` and ``diffshield eval protection``.

Attack as Defense (Zhang et al., arXiv 2410.14966): an imperceptible perturbation makes inpainting models paint
the protected region a solid wrong colour, while other edits keep working.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffshield.cli.common import add_device_args, add_threads_arg, seed_int
from diffshield.cli.common import positive_int as _positive_int
from diffshield.core.errors import DiffshieldError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

#: the smallest image side the inpainters take (their padding and down-sampling need it)
MIN_SIDE = 16
#: above this many pixels per image, protect warns with its expected time and memory
LARGE_PIXELS = 1024 * 1024
#: measured on a 2-core CPU with the toy inpainter, one thread: seconds per Adam step and GB of peak memory, per
#: megapixel (256 and 512 px images)
SECONDS_PER_STEP_PER_MP = 6.5
GB_PER_MP = 4.0


def _float_in(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo < v <= hi:
            raise argparse.ArgumentTypeError(f"must lie in ({lo}, {hi}], got {v}")
        return v

    return parse



# ----------------------------------------------------------------------------------------------- image I/O


def _transparent_key(im) -> bool:
    """Whether a non-palette image's tRNS colour key (``im.info["transparency"]``) matches any of its pixels."""
    import numpy as np

    key = im.info.get("transparency")
    if key is None or im.mode in ("P", "RGBA", "LA", "PA", "La", "RGBa"):
        return False
    arr = np.asarray(im)
    if arr.ndim == 3:
        if not isinstance(key, tuple) or len(key) != arr.shape[2]:
            return True  # a key we cannot compare: assume it is used
        return bool((arr == np.asarray(key, dtype=arr.dtype)).all(axis=2).any())
    if isinstance(key, tuple | bytes):
        return True
    return bool((arr == key).any())


def _to_rgb_array(im, path: Path):
    """The stated conversion rules: 8-bit RGB as is; greyscale (1-, 8- or 16-bit) copied into R, G and B; 16-bit
    values divided by 65535; palette images through their palette; alpha dropped only when every pixel is opaque.
    Refused in one line: transparency (an alpha channel, a palette's or a tRNS colour key that some pixel uses),
    CMYK, float and 32-bit images."""
    import numpy as np

    mode = im.mode
    if mode == "CMYK":
        raise DiffshieldError(f"'{path}' is a CMYK image; convert it to RGB with a colour-managed tool first "
                              "(a naive conversion would change its colours)")
    if _transparent_key(im):
        raise DiffshieldError(f"'{path}' has transparent pixels (a transparency colour key); the protection works on "
                              "opaque RGB: flatten it onto a background first")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            raise DiffshieldError(f"'{path}' has transparent pixels (alpha channel); the protection works on opaque "
                                  "RGB: flatten it onto a background first")
        im = im.convert("RGB" if mode != "LA" else "L")
        mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise DiffshieldError(f"'{path}' is a 32-bit integer image; give an 8- or 16-bit PNG")
        grey = (arr / 65535).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("1", "L"):
        grey = np.asarray(im.convert("L"), dtype=np.float32) / 255
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(im, dtype=np.float32) / 255
    if mode in ("YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    raise DiffshieldError(f"'{path}' has pixel format {mode!r}, which diffshield does not read; give an 8- or "
                          "16-bit RGB or greyscale PNG")


def _raw_mode(im) -> str:
    """The pixel layout in the file (Pillow's raw mode, e.g. ``"RGB;16B"`` for a 16-bit RGB PNG); "" if unknown.
    Read before ``load()``, which forgets it."""
    tile = getattr(im, "tile", None) or []
    if not tile:
        return ""
    args = tile[0][3] if len(tile[0]) > 3 else None
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else ""


def _frames(im) -> int:
    """Pages or frames of an image file; 1 for a camera JPEG stored as MPO (the primary image plus previews or a
    depth map, of which the primary image is the photo)."""
    return 1 if im.format == "MPO" else getattr(im, "n_frames", 1)


def _check_layout(im, path: Path) -> None:
    """Refuse, in one line, files that Pillow would read wrongly or only in part: several frames or pages (only the
    first would be protected) and 16-bit colour (Pillow keeps the high byte of each channel only)."""
    frames = _frames(im)
    if frames > 1:
        raise DiffshieldError(f"'{path}' holds {frames} pages or frames; diffshield protects one image: save the "
                              "page to protect as its own PNG")
    raw = _raw_mode(im)
    if im.mode in ("RGB", "RGBA") and (";16" in raw or ";48" in raw or ";64" in raw):
        raise DiffshieldError(f"'{path}' is a 16-bit colour image, which Pillow reads only at 8 bits per channel "
                              "(the result would break the --eps budget against the true values); convert it to "
                              "8-bit RGB first")


def load_image(path: str | Path):
    """Read an image file as a (1, 3, H, W) float tensor in [0, 1]; one-line error for anything else.

    Pixel formats follow :func:`_to_rgb_array`: greyscale becomes three equal channels, 16-bit greyscale values are
    scaled by 1/65535, palette images are expanded, an all-opaque alpha channel is dropped; transparency, CMYK,
    16-bit colour (which Pillow cannot read at full depth) and files with several pages or frames are refused.
    Images smaller than :data:`MIN_SIDE` on a side are refused.
    """
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DiffshieldError(f"image '{path}' does not exist or is not a file")
    try:
        with Image.open(path) as im:
            _check_layout(im, path)
            im.load()
            arr = _to_rgb_array(ImageOps.exif_transpose(im), path)  # as viewers show it (a phone photo's rotation)
    except DiffshieldError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DiffshieldError(f"'{path}' is not an image Pillow can read ({type(e).__name__}); give a PNG or JPEG "
                              "file") from None
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DiffshieldError(f"'{path}' is {w}x{h}; the inpainters need at least {MIN_SIDE} px on each side")
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def warn_if_large(shape, steps: int, n: int = 1) -> None:
    """Print the expected time and memory when an image is above :data:`LARGE_PIXELS` pixels."""
    import sys

    mp = shape[-1] * shape[-2] / 1e6
    if shape[-1] * shape[-2] > LARGE_PIXELS:
        secs = SECONDS_PER_STEP_PER_MP * mp * steps * n
        print(f"warning: {shape[-1]}x{shape[-2]} px is large: expect about {secs:.0f} "
              f"s on one CPU thread and {GB_PER_MP * mp:.1f} GB of memory for {steps} steps (measured on the toy "
              "inpainter; shrink the image or lower --steps for less)", file=sys.stderr)


def _mask_array(im, path: Path, what: str):
    """A mask image as an (H, W) bool array: pixels at or above half of full scale are True (128 of 255 for 8-bit
    files, 32768 of 65535 for 16-bit ones). Transparent pixels are refused: their colour means nothing."""
    import numpy as np

    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    if (alpha is not None and alpha.min() < 255) or _transparent_key(im):
        raise DiffshieldError(f"{what} '{path}' has transparent pixels; give a black-and-white mask without "
                              "transparency (white = region)")
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise DiffshieldError(f"{what} '{path}' is a 32-bit integer image; give an 8- or 16-bit PNG")
        return arr >= 32768
    if im.mode == "F":
        raise DiffshieldError(f"{what} '{path}' is a floating-point image; give a black-and-white PNG")
    return np.asarray(im.convert("L"), dtype=np.uint8) >= 128


def load_mask(path: str | Path, size: tuple[int, int] | None = None, what: str = "mask"):
    """Read a mask image as (1, 1, H, W) {0, 1}: pixels at or above half of full scale (128 for 8-bit files, 32768
    for 16-bit ones; colour converted to greyscale) are 1 = protect.

    Masks with transparent pixels and files with several pages or frames are refused in one line.

    Args:
        path: image file (any mode; converted to greyscale).
        size: expected (H, W) (default None: not checked).
        what: name used in error messages (default "mask").
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DiffshieldError(f"{what} '{path}' does not exist or is not a file")
    try:
        with Image.open(path) as im:
            frames = _frames(im)
            if frames > 1:
                raise DiffshieldError(f"{what} '{path}' holds {frames} pages or frames; give a single "
                                      "black-and-white PNG")
            im.load()
            arr = _mask_array(ImageOps.exif_transpose(im), path, what)
    except DiffshieldError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DiffshieldError(f"{what} '{path}' is not an image Pillow can read ({type(e).__name__}); give a "
                              "black-and-white PNG (white = region)") from None
    if size is not None and arr.shape != tuple(size):
        raise DiffshieldError(f"{what} '{path}' is {arr.shape[1]}x{arr.shape[0]} but the image is "
                              f"{size[1]}x{size[0]}; give a {what} of the image's size")
    m = torch.from_numpy(arr.astype(np.float32))[None, None]
    return m


def _check_benign(benign, m, path) -> None:
    if float((benign * m).sum()) > 0:
        raise DiffshieldError(f"benign mask '{path}' overlaps the protected region; a benign edit lies outside "
                              "the --mask region")


def _check_region(mask, path: Path, what: str = "mask") -> None:
    area = float(mask.sum())
    if area == 0:
        raise DiffshieldError(f"{what} '{path}' is empty (no white pixel); paint the region to protect in white")
    if area == mask.numel():
        raise DiffshieldError(f"{what} '{path}' covers the whole image; mark only the region to protect")


def _icc_profile(path: Path) -> bytes | None:
    """The colour profile embedded in an image file (a phone's Display P3, ...), if any, when it describes RGB
    data: the protected PNG is RGB, so a greyscale (or other) profile would make it invalid and is dropped (viewers
    then show the PNG as sRGB, which a grey gamma-2.2 profile matches closely)."""
    from PIL import Image

    with Image.open(path) as im:
        icc = im.info.get("icc_profile") or None
    if icc is not None and icc[16:20] != b"RGB ":  # the profile header's data colour space
        return None
    return icc


#: the PNG text chunk, with value "protect", that marks a protected image written by ``diffshield protect``
COMMAND_CHUNK = "diffshield-command"


def is_protect_output(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that ``diffshield protect`` wrote (signed, with :data:`COMMAND_CHUNK` = protect)."""
    from PIL import Image

    from diffshield.core.io import written_by_diffshield

    if not written_by_diffshield(path):
        return False
    try:
        with Image.open(path) as im:
            return im.info.get(COMMAND_CHUNK) == "protect"
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _check_out_png(out: Path, overwrite: bool) -> None:
    """Single-image mode: ``--out`` may replace only a previous ``diffshield protect`` output, and only with
    ``--overwrite`` (checked before the work and again just before writing)."""
    if not out.exists():
        return
    if not is_protect_output(out):
        raise DiffshieldError(f"--out '{out}' exists and is not a protected image written by 'diffshield protect'; "
                              "choose another file name (--overwrite replaces only a previous protect output)")
    if not overwrite:
        raise DiffshieldError(f"--out '{out}' holds a previous 'diffshield protect' output; pass --overwrite to "
                              "replace it, or choose another file name")


def _save_png(image, path: Path, icc: bytes | None = None) -> None:
    """The protected PNG, signed (``Software`` and :data:`COMMAND_CHUNK`), with the original's colour profile
    (``icc``) so that it displays as the original does; written atomically."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from diffshield.core.io import atomic_write_bytes, signature, to_pil

    info = PngInfo()
    info.add_text("Software", signature())
    info.add_text(COMMAND_CHUNK, "protect")
    buf = io.BytesIO()
    kw = {"icc_profile": icc} if icc else {}
    to_pil(image).save(buf, format="PNG", pnginfo=info, **kw)
    atomic_write_bytes(path, buf.getvalue())


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_for(image: Path, masks: Path) -> Path | None:
    """The mask of ``image`` in the folder ``masks``: the file of the same name, else the same stem with an image
    suffix (in :data:`IMAGE_SUFFIXES` order, lower case first, then any case: C.PNG for C.png)."""
    same = masks / image.name
    if same.is_file():
        return same
    for s in IMAGE_SUFFIXES:
        if (masks / (image.stem + s)).is_file():
            return masks / (image.stem + s)
    found = sorted((p for p in masks.iterdir() if p.is_file() and p.stem == image.stem
                    and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: (IMAGE_SUFFIXES.index(p.suffix.lower()),
                                                                            p.name))
    return found[0] if found else None


def _check_names(files: list[Path], src: Path) -> None:
    """Folder mode writes OUT/<stem>.png: refuse images whose stems differ only in case or suffix (a.png, a.jpg,
    A.png), which would write the same output file."""
    seen: dict[str, Path] = {}
    for f in files:
        key = f.stem.lower()
        if key in seen:
            raise DiffshieldError(f"'{seen[key].name}' and '{f.name}' in '{src}' would both be written as "
                                  f"{f.stem}.png; rename one of them (output names ignore the suffix and case)")
        seen[key] = f


# ----------------------------------------------------------------------------------------------- protect


def _config(args):
    from diffshield.protect.attack_as_defense import MIN_EPS, AttackAsDefenseConfig
    from diffshield.protect.robust import EOTConfig

    if args.eot_samples is not None and not args.robust:
        raise DiffshieldError("--eot-samples applies only with --robust; add --robust or drop --eot-samples")
    if args.eps < MIN_EPS - 1e-12:
        raise DiffshieldError(f"--eps {args.eps} is below one 8-bit step (1/255 = {MIN_EPS:.5f}): the protected "
                              "PNG has 8-bit levels, so no pixel could move; give --eps 0.004 or more")
    eot = EOTConfig(samples=args.eot_samples or 1) if args.robust else None
    return AttackAsDefenseConfig(eps=args.eps, steps=args.steps, target=args.target, seed=args.seed, eot=eot)


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def cb(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    return bar, cb


def cmd_protect(args) -> int:
    import torch

    from diffshield.core.io import (
        atomic_dir,
        atomic_write_json,
        check_output_dir,
        check_output_file,
        write_result_json,
    )
    from diffshield.protect.attack_as_defense import protect
    from diffshield.protect.inpainters import load_inpainter

    cfg = _config(args)
    src, msk, out = Path(args.image), Path(args.mask), Path(args.out)
    if not src.exists():
        raise DiffshieldError(f"input '{src}' does not exist; give an image file or a folder of images")
    inputs = [src, msk, args.inpainter]
    if src.is_file():
        if out.suffix.lower() != ".png":
            raise DiffshieldError(f"--out '{out}' must end in .png: a lossy format would erase the protection")
        if msk.is_dir():
            raise DiffshieldError(f"--mask '{msk}' is a folder but the input is one image; give one mask file")
        check_output_file(out, "--out", inputs=inputs)
        _check_out_png(out, args.overwrite)
        check_output_file(args.json, "--json", inputs=[*inputs, out])
        x = load_image(src)
        m = load_mask(msk, tuple(x.shape[-2:]))
        _check_region(m, msk)
        warn_if_large(x.shape, cfg.steps * (1 + (cfg.eot.samples if cfg.eot else 0)))
        inpainter = load_inpainter(args.inpainter, device=args.device)
        bar, cb = _progress_bar(cfg.steps, src.name)
        res = protect(inpainter, x, m, cfg, progress=cb)
        bar.close()
        check_output_file(out, "--out", inputs=inputs)  # nothing else appeared there meanwhile
        _check_out_png(out, args.overwrite)
        _save_png(res.protected[0], out, _icc_profile(src))
        info = {"image": str(src), "mask": str(msk), "out": str(out), "seconds": round(res.seconds, 2),
                "linf": float(res.delta.abs().max()), "target_colour": res.target_colour,
                "loss_first": res.losses[0], "loss_last": res.losses[-1]}
        print(f"protected {src} -> {out} in {res.seconds:.1f} s (|delta|_inf = {info['linf']:.4f}, "
              f"loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f})")
        if args.json:
            write_result_json(args.json, {**info, "inpainter": str(args.inpainter), "eps": cfg.eps,
                                          "steps": cfg.steps, "robust": bool(args.robust)})
        return 0
    # folder mode: every image in IMG with the same-named mask in MASK (or one mask file for all)
    if args.json:
        raise DiffshieldError("--json is for one image; in folder mode the run report is --out's manifest.json")
    if out.suffix.lower() in IMAGE_SUFFIXES:  # a folder named like an image: surely meant for one image
        raise DiffshieldError(f"'{src}' is a folder, so --out is the folder of protected images; '{out}' is an "
                              "image name: give a folder name")
    check_output_dir(out, "protect", args.overwrite, inputs=inputs)
    if not msk.exists():
        raise DiffshieldError(f"--mask '{msk}' does not exist; give a folder of masks named like the images, or "
                              "one mask file")
    if msk.is_dir() and msk.resolve() == src.resolve():
        raise DiffshieldError(f"--mask '{msk}' is the image folder itself; give a separate folder of masks named "
                              "like the images, or one mask file")
    files = _images_in(src)
    if msk.is_file():  # a shared mask kept among the images is the mask, not an image to protect
        skipped = [f for f in files if f.resolve() == msk.resolve()]
        files = [f for f in files if f.resolve() != msk.resolve()]
        if skipped:
            print(f"note: '{skipped[0]}' is the --mask file; it is not protected", file=sys.stderr)
    if not files:
        raise DiffshieldError(f"folder '{src}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    _check_names(files, src)
    items = []
    for f in files:
        mf = msk if msk.is_file() else _mask_for(f, msk)
        if mf is None:
            raise DiffshieldError(f"no mask for '{f.name}' in '{msk}' (expected {f.stem}.png)")
        x = load_image(f)
        m = load_mask(mf, tuple(x.shape[-2:]))
        _check_region(m, mf)
        items.append((f, x, m))
    largest = max(items, key=lambda it: it[1].shape[-1] * it[1].shape[-2])[1].shape
    warn_if_large(largest, cfg.steps * (1 + (cfg.eot.samples if cfg.eot else 0)), n=len(items))
    inpainter = load_inpainter(args.inpainter, device=args.device)
    groups: dict[tuple[int, int], list] = {}
    for it in items:
        groups.setdefault(tuple(it[1].shape[-2:]), []).append(it)
    rows = []
    t0 = time.time()
    with atomic_dir(out, overwrite=args.overwrite, command="protect", inputs=inputs) as tmp:
        done = 0
        for _size, group in groups.items():
            for i in range(0, len(group), args.batch_size):
                chunk = group[i:i + args.batch_size]
                bar, cb = _progress_bar(cfg.steps, f"images {done + 1}-{done + len(chunk)} of {len(items)}")
                res = protect(inpainter, torch.cat([c[1] for c in chunk]), torch.cat([c[2] for c in chunk]), cfg,
                              progress=cb)
                bar.close()
                for j, (f, _x, _m) in enumerate(chunk):
                    _save_png(res.protected[j], tmp / (f.stem + ".png"), _icc_profile(f))
                    rows.append({"image": f.name, "out": f.stem + ".png",
                                 "linf": float(res.delta[j].abs().max()),
                                 "target_colour": None if res.target_colour is None else res.target_colour[j]})
                done += len(chunk)
        atomic_write_json(tmp / "manifest.json", {"inpainter": str(args.inpainter), "eps": cfg.eps,
                                                  "steps": cfg.steps, "robust": bool(args.robust), "images": rows})
    print(f"protected {len(items)} images -> {out} in {time.time() - t0:.1f} s (manifest.json lists them)")
    return 0


# ----------------------------------------------------------------------------------------------- eval protection


#: |protected - original|_inf above this many times protect's default budget draws a warning: probably not its
#: protection
FAR_FROM_ORIGINAL = 4


PANEL_COLUMNS = ("image (outlined: magenta = protected region M, cyan = benign-edit region)",
                 "malicious inpaint of M", "malicious inpaint of M_e (M grown by the expand setting)",
                 "benign inpaint (outside M)", "perturbation: protected - original, amplified (grey = 0)")


def labelled_panel(images: dict, index: int | slice = slice(0, 4), upscale: int = 1):
    """The panel of :func:`diffshield.protect.metrics.panel` with its rows and columns named, a fifth column that
    shows the perturbation (protected - original, amplified so that the largest change reaches full scale; the
    original's row shows none), and a gap between scenes. The protection works when the malicious inpaints of the
    protected row are the target colour and the benign inpaint is unchanged."""
    import torch
    from PIL import Image

    from diffshield.core.io import label_grid, make_grid
    from diffshield.protect.metrics import panel

    n = images["original"].shape[0]
    idx = list(range(n)[index]) if isinstance(index, slice) else [index]
    delta = images["protected"][idx] - images["original"][idx]
    gain = 0.5 / max(float(delta.abs().max()), 1.0 / 255)
    pad = 2
    blocks = []
    for k, i in enumerate(idx):
        grid = panel(images, i, upscale=upscale)
        d = (0.5 + gain * (images["protected"][i] - images["original"][i])).clamp(0, 1)
        col = make_grid(torch.stack([torch.ones_like(d), d]), nrow=1, upscale=upscale, pad=pad)
        both = Image.new("RGB", (grid.width + col.width - pad, grid.height), (255, 255, 255))
        both.paste(grid, (0, 0))
        both.paste(col.crop((pad, 0, col.width, col.height)), (grid.width, 0))
        name = f"scene {i + 1}: " if len(idx) > 1 else ""
        title = (f"Protection panel: per image, the original row and the protected row; the protection works when "
                 f"the malicious inpaints of the protected row are the target colour. Perturbation amplified "
                 f"x{gain:.0f}." if k == 0 else None)
        blocks.append(label_grid(both, 2, 5, [f"{name}original", f"{name}protected"],
                                 list(PANEL_COLUMNS) if k == 0 else None, title, pad=pad))
    gap = 10
    width = max(b.width for b in blocks)
    out = Image.new("RGB", (width, sum(b.height for b in blocks) + gap * (len(blocks) - 1)), (255, 255, 255))
    y = 0
    for b in blocks:
        out.paste(b, (width - b.width, y))
        y += b.height + gap
    return out


def cmd_eval_protection(args) -> int:
    from diffshield.core.io import check_output_file, save_result_image, write_result_json
    from diffshield.protect.attack_as_defense import AttackAsDefenseConfig
    from diffshield.protect.inpainters import load_inpainter
    from diffshield.protect.metrics import evaluate_protection

    panel_path = Path(args.panel) if args.panel else Path(args.protected).with_name(
        Path(args.protected).stem + "_panel.png")
    if panel_path.suffix.lower() != ".png":
        raise DiffshieldError(f"--panel '{panel_path}' must end in .png")
    inputs = [args.image, args.protected, args.mask, args.benign_mask, args.inpainter]
    check_output_file(panel_path, "--panel", inputs=inputs)
    check_output_file(args.json, "--json", inputs=[*inputs, panel_path])
    x = load_image(args.image)
    xp = load_image(args.protected)
    if xp.shape != x.shape:
        raise DiffshieldError(f"--protected is {xp.shape[3]}x{xp.shape[2]} but --image is {x.shape[3]}x{x.shape[2]}")
    linf, budget = float((xp - x).abs().max()), AttackAsDefenseConfig().eps
    if linf > FAR_FROM_ORIGINAL * budget:  # a mix-up of files, most likely: said before the figures are read
        print(f"warning: --protected differs from --image by up to {linf:.3f} ({linf * 255:.0f}/255), far more than "
              f"a protection moves pixels (protect's budget: --eps, default {budget}); is it the protected version "
              f"of '{args.image}'?", file=sys.stderr)
    m = load_mask(args.mask, tuple(x.shape[-2:]))
    _check_region(m, Path(args.mask))
    benign = None
    if args.benign_mask:
        benign = load_mask(args.benign_mask, tuple(x.shape[-2:]), what="benign mask")
        if benign.sum() == 0:
            raise DiffshieldError(f"benign mask '{args.benign_mask}' is empty; paint the area to edit in white")
        _check_benign(benign, m, args.benign_mask)
    inpainter = load_inpainter(args.inpainter, device=args.device)
    res = evaluate_protection(inpainter, x, xp, m, benign=benign, target=args.target)
    imgs = res.pop("_images")
    res.pop("per_image")
    res.update({"image": str(args.image), "protected": str(args.protected), "mask": str(args.mask),
                "inpainter": str(args.inpainter)})
    yes = lambda v: "yes" if v >= 1 else "no"  # noqa: E731
    print(f"protection of {args.protected} against {args.inpainter}:")
    print(f"  attacker mask M   -> target colour: {yes(res['success_rate'])}  (unprotected: "
          f"{yes(res['success_rate_unprotected'])})")
    print(f"  expanded mask M_e -> target colour: {yes(res['success_rate_expanded'])}")
    for k in ("dilate4", "half", "box"):
        print(f"  partial mask {k:<7}-> target colour: {yes(res[f'success_rate_partial_{k}'])}")
    pb = res["psnr_benign"]
    print(f"  benign edit PSNR vs unprotected edit: {'-' if pb is None else f'{pb:.2f} dB'}")
    print(f"  PSNR(protected, original): {res['psnr_protected']:.2f} dB; |delta|_inf = {res['linf']:.4f}")
    up = max(1, 256 // max(x.shape[-2:]))
    save_result_image(labelled_panel(imgs, 0, upscale=up), panel_path, "--panel")
    print(f"  panel (rows: original, protected; columns: image, inpaint M, inpaint M_e, benign inpaint, "
          f"perturbation): {panel_path}")
    if args.json:
        write_result_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------- demo


def demo_step(out: Path, device: str = "cpu") -> dict:
    """Protect 4 toy scenes with the shipped toy inpainter, evaluate them, write ``out/panel.png``.

    Takes well under 30 s on a CPU. Prints a few lines and returns a JSON-able summary.
    """
    from diffshield.core.io import atomic_write_json
    from diffshield.protect.attack_as_defense import protect
    from diffshield.protect.inpainters import load_inpainter
    from diffshield.protect.metrics import evaluate_protection
    from diffshield.protect.scenes import make_scenes, protected_masks

    out = Path(out)  # the demo's own folder for this step (demo_out/protect/)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("[protect] Attack as Defense on 4 toy scenes with the shipped toy inpainter (toy:inpaint) ...")
    f = load_inpainter("toy", device=device)
    scenes = make_scenes(4, 64, seed=2024)
    m = protected_masks(scenes.object_masks)
    res = protect(f, scenes.images, m)
    ev = evaluate_protection(f, scenes.images, res.protected, m)
    imgs = ev.pop("_images")
    ev.pop("per_image")
    labelled_panel(imgs, slice(0, 4), upscale=3).save(out / "panel.png")
    summary = {k: ev[k] for k in ("success_rate", "success_rate_unprotected", "success_rate_expanded",
                                  "psnr_protected", "psnr_benign", "linf")}
    summary["seconds"] = round(time.time() - t0, 1)
    summary["panel"] = str(out / "panel.png")
    atomic_write_json(out / "summary.json", summary)
    print(f"[protect] malicious inpaint paints the target colour: {ev['success_rate']:.0%} of protected images "
          f"(unprotected: {ev['success_rate_unprotected']:.0%}); with the 8-px larger mask: "
          f"{ev['success_rate_expanded']:.0%}")
    print(f"[protect] PSNR(protected, original) {ev['psnr_protected']:.1f} dB; benign edits vs unprotected "
          f"{ev['psnr_benign']:.1f} dB; {summary['seconds']} s")
    print(f"[protect] panel: {out / 'panel.png'}  (per scene: original row, protected row; columns: image, "
          "inpaint M, inpaint M_e, benign inpaint, perturbation)")
    return summary


# ----------------------------------------------------------------------------------------------- register


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inpainter", default="toy",
                   help="'toy' (the shipped toy LaMa-style inpainter), a toy inpainter folder, or a TorchScript "
                        "file such as LaMa's big-lama.pt (default: toy)")
    p.add_argument("--target", choices=["colour", "invert"], default="colour",
                   help="target of the protection: the solid colour farthest from the image's mean colour, or "
                        "1 - image; for 'eval protection', the --target that 'protect' was given (default: colour)")
    add_threads_arg(p)
    add_device_args(p, float32_only=True, autocast=False)


def _eval_subparsers(sub: argparse._SubParsersAction):
    """The sub-subparsers of the existing ``eval`` command, if main.py defined one."""
    ev = sub.choices.get("eval")
    if ev is None:
        return None
    for action in ev._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(sub: argparse._SubParsersAction) -> None:
    """Add this pillar's subcommands to the ``diffshield`` parser: ``protect`` and ``eval protection``."""
    p = sub.add_parser(
        "protect", help="protect images from inpainting edits (Attack as Defense)",
        description="Add an imperceptible perturbation (L-inf <= eps) so that inpainting the masked region paints "
                    "a solid, obviously wrong colour, while edits elsewhere keep working (Attack as Defense, Zhang "
                    "et al. 2024). IMG may be a folder: then MASK is a folder of same-named masks (or one mask "
                    "file for all, which is not protected itself if it lies in IMG) and OUT a folder of <stem>.png "
                    "files (images whose names differ only in suffix or case are refused), with manifest.json "
                    "(docs/protect.md). Time on one CPU thread with the toy inpainter: about 1 s per 64 px image, "
                    "8 s for 256x256 (--robust about twice that).")
    p.add_argument("image", metavar="IMG", help="image file, or a folder of images")
    p.add_argument("--mask", required=True,
                   help="black-and-white mask of the same size, white = region to protect (a folder in folder mode)")
    p.add_argument("--out", required=True, help="output .png (a folder in folder mode; written atomically; "
                                                "never one of the inputs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds a previous output of 'diffshield protect' (a protected PNG it "
                        "wrote; in folder mode, a folder recognised by its .diffshield-output.json file); nothing "
                        "else is ever replaced")
    p.add_argument("--eps", type=_float_in(0, 1), default=0.025,
                   help="L-inf budget on the [0, 1] scale, in [1/255, 1] (default: 0.025, about 6/255); the "
                        "perturbation starts uniform in [0, min(0.01, eps))")
    p.add_argument("--steps", type=_positive_int, default=20, help="Adam steps (default: 20)")
    p.add_argument("--robust", action="store_true",
                   help="expectation over transformations (JPEG, resize, uint8, larger masks): more robust "
                        "protection at (1 + --eot-samples) times the cost (default: off, as in the paper)")
    p.add_argument("--eot-samples", type=_positive_int, default=None,
                   help="transformed views per step; only with --robust (default: 1)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images of equal size protected together in folder mode (default: 8)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the perturbation's initialisation (default: 0)")
    p.add_argument("--json", help="write a run report (time, |delta|, losses) to this JSON file (single-image mode; "
                                  "a folder's report is OUT/manifest.json)")
    _add_common(p)
    p.set_defaults(func=cmd_protect)

    esub = _eval_subparsers(sub)
    help_ = "protection of an image against inpainting: malicious and benign edits, PSNR"
    desc = ("Inpaint the original and the protected image with the protected mask M, the 8-px larger mask M_e, "
            "partial masks and a benign mask outside the region; print whether each malicious fill is the target "
            "colour (>= 90 % of hole pixels within 0.2), benign-edit PSNR and PSNR(protected, original); write a "
            "panel image.")
    e = esub.add_parser("protection", help=help_, description=desc) if esub else sub.add_parser(
        "eval-protection", help=help_, description=desc)
    e.add_argument("--image", required=True, help="the original image")
    e.add_argument("--protected", required=True, help="the protected image (as written by 'diffshield protect')")
    e.add_argument("--mask", required=True, help="the protected region (white = protected)")
    e.add_argument("--benign-mask", help="mask of a benign edit outside the region (default: a random box outside "
                                         "the expanded region)")
    e.add_argument("--json", help="write the metrics to this JSON file")
    e.add_argument("--panel", help="panel PNG (default: <protected>_panel.png next to the protected image)")
    _add_common(e)
    e.set_defaults(func=cmd_eval_protection)

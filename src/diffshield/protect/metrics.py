"""Metrics and panels for image protection against inpainting (Attack as Defense, Zhang et al., arXiv 2410.14966).

- success: an inpaint of a protected image "fails for the attacker" when at least ``frac`` (default 90 %) of the
  hole's pixels lie within ``tol`` (default 0.2, max over RGB channels, [0, 1] scale) of the target.
- benign PSNR: PSNR inside a mask that misses the protected region, between the inpaint of the protected image
  and the inpaint of the original (the owner's own edits must keep working).
- PSNR(protected, original) over the whole image and the L-inf norm of the perturbation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from diffshield.core.errors import DiffshieldError
from diffshield.protect.attack_as_defense import check_images, check_masks, expand_mask, target_colour
from diffshield.protect.scenes import benign_masks, partial_masks

Inpaint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def target_fraction(fill: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, tol: float = 0.2) -> torch.Tensor:
    """Per image, the fraction of hole pixels whose colour is within ``tol`` (max over channels, default 0.2) of
    the target; NaN for an empty mask."""
    close = ((fill - target).abs().amax(dim=1, keepdim=True) <= tol).to(fill.dtype)
    area = mask.sum(dim=(1, 2, 3))
    frac = (close * mask).sum(dim=(1, 2, 3)) / area.clamp_min(1)
    return torch.where(area > 0, frac, torch.full_like(frac, float("nan")))


def hole_distance(fill: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over hole pixels of the max-over-channels distance to the target (0 = exactly the
    target); NaN for an empty mask. A graded companion of :func:`success`."""
    d = (fill - target).abs().amax(dim=1, keepdim=True)
    area = mask.sum(dim=(1, 2, 3))
    v = (d * mask).sum(dim=(1, 2, 3)) / area.clamp_min(1)
    return torch.where(area > 0, v, torch.full_like(v, float("nan")))


def success(fill: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, tol: float = 0.2,
            frac: float = 0.9) -> torch.Tensor:
    """Per-image protection success (bool tensor): at least ``frac`` (default 0.9) of the hole within ``tol``
    (default 0.2) of the target. Empty masks count as failures."""
    f = target_fraction(fill, target, mask, tol)
    return torch.nan_to_num(f, nan=-1.0) >= frac


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, over the whole image or inside ``mask``; NaN where the mask is empty, capped at 100 dB
    for identical images."""
    if mask is None:
        mask = torch.ones_like(a[:, :1])
    area = 3 * mask.sum(dim=(1, 2, 3))
    mse = (mask * (a - b) ** 2).sum(dim=(1, 2, 3)) / area.clamp_min(1)
    val = 10 * torch.log10(peak**2 / mse.clamp_min(1e-10))
    return torch.where(area > 0, val, torch.full_like(val, float("nan")))


def _nanmean(t: torch.Tensor) -> float | None:
    t = t[~torch.isnan(t)]
    return None if t.numel() == 0 else float(t.mean())


def make_target(original: torch.Tensor, kind: str = "colour") -> torch.Tensor:
    """The target image T the protection aimed at: the solid target colour of each original, or 1 - original."""
    if kind == "invert":
        return 1 - original
    return target_colour(original)[:, :, None, None].expand_as(original)


@torch.no_grad()
def evaluate_protection(inpainter: Inpaint, original: torch.Tensor, protected: torch.Tensor, mask: torch.Tensor,
                        benign: torch.Tensor | None = None, target: str = "colour", expand: int = 8,
                        partial: bool = True, batch: int = 64, seed: int = 0) -> dict:
    """Malicious and benign inpaints of original vs protected images, and the protection metrics.

    Args:
        inpainter: ``f(image, mask) -> image``.
        original, protected: (N, 3, H, W) floats in [0, 1], at least 16 px a side, of the same shape
            (``protected`` may have been JPEG'd/resized since); anything else is refused in one line.
        mask: (N, 1, H, W), the protected region M; binarised (> 0.5) as :func:`protect` does. Empty or
            all-covering masks are refused.
        benign: (N, 1, H, W) masks that miss the region, binarised (> 0.5) (default: random boxes outside M_e;
            images with none are skipped in the benign figures).
        target: ``"colour"`` or ``"invert"`` (default "colour").
        expand: M_e's expansion in px (default 8).
        partial: also evaluate partial attacker masks (default True).
        batch: images per inpainter call (default 64).
        seed: seed of the random benign and partial masks (default 0).

    Returns:
        dict of summary figures (``success_rate``, ``success_rate_expanded``, ``success_rate_partial_*``,
        ``psnr_protected``, ``psnr_benign``, ``linf``, graded ``target_fraction_*`` and ``distance_to_target_*``
        for the protected and the unprotected image, ...) plus per-image lists under ``per_image`` and the
        inpainted images under ``_images`` (tensors; pop it before writing JSON).

    A ``target`` other than "colour" or "invert" (a typo would have judged the colour target), a negative or
    non-integer ``expand``, a ``batch`` below 1 and a non-integer or negative ``seed`` are refused in one line.
    """
    from diffshield.core.checks import whole_number

    if target not in ("colour", "invert"):
        raise DiffshieldError(f"target must be 'colour' or 'invert' (as protect's config), got {target!r}")
    expand, batch, seed = (whole_number(v, k) for v, k in ((expand, "expand"), (batch, "batch"), (seed, "seed")))
    if expand < 0 or batch < 1 or seed < 0:
        raise DiffshieldError(f"expand and seed must be >= 0 and batch >= 1, got {expand}, {seed} and {batch}")
    if not callable(inpainter):
        raise DiffshieldError(f"inpainter must be callable as f(image, mask), got {type(inpainter).__name__}")
    check_images(original, "original images")
    check_images(protected, "protected images")
    if protected.shape != original.shape:
        raise DiffshieldError(f"protected images are {tuple(protected.shape)} but the originals "
                              f"{tuple(original.shape)}; give one protected image per original, of its size")
    original, protected = original.float(), protected.float()
    if not isinstance(mask, torch.Tensor):
        raise DiffshieldError(f"mask must be a torch tensor (N, 1, H, W), got {type(mask).__name__}")
    mask = check_masks(original, mask.float())
    if benign is not None:
        if isinstance(benign, torch.Tensor) and benign.dim() == 3:
            benign = benign[:, None]
        if not isinstance(benign, torch.Tensor) or benign.shape != mask.shape:
            raise DiffshieldError(f"benign masks must be a tensor of the masks' shape {tuple(mask.shape)}")
        benign = (benign.float() > 0.5).to(original.dtype)
    me = expand_mask(mask, expand)
    if benign is None:
        benign = benign_masks(expand_mask(mask, expand + 1), seed=seed)
    tgt = make_target(original, target)
    masks = {"M": mask, "M_e": me}
    if partial:
        masks.update({f"partial_{k}": v for k, v in partial_masks(mask, seed=seed).items()})

    def run(x, m):
        return torch.cat([inpainter(x[i:i + batch], m[i:i + batch]) for i in range(0, len(x), batch)])

    res: dict = {"n_images": int(original.shape[0])}
    per: dict = {}
    imgs: dict = {}
    for name, m in masks.items():
        fill_p, fill_o = run(protected, m), run(original, m)
        s_p, s_o = success(fill_p, tgt, m), success(fill_o, tgt, m)
        key = {"M": "success_rate", "M_e": "success_rate_expanded"}.get(name, f"success_rate_{name}")
        res[key] = float(s_p.float().mean())
        res[key + "_unprotected"] = float(s_o.float().mean())
        tf_p, tf_o = target_fraction(fill_p, tgt, m), target_fraction(fill_o, tgt, m)
        d_p, d_o = hole_distance(fill_p, tgt, m), hole_distance(fill_o, tgt, m)
        res[f"target_fraction_{name}"], res[f"target_fraction_{name}_unprotected"] = _nanmean(tf_p), _nanmean(tf_o)
        res[f"distance_to_target_{name}"], res[f"distance_to_target_{name}_unprotected"] = _nanmean(d_p), _nanmean(d_o)
        per[key] = s_p.tolist()
        per["target_fraction_" + name] = tf_p.tolist()
        if name in ("M", "M_e"):
            imgs[name] = (fill_o, fill_p)
    has_b = benign.sum(dim=(1, 2, 3)) > 0
    b_o, b_p = run(original, benign), run(protected, benign)
    pb = psnr(b_p, b_o, benign)
    res["psnr_benign"] = _nanmean(pb)
    res["psnr_benign_min"] = None if not has_b.any() else float(pb[has_b].min())
    res["benign_images"] = int(has_b.sum())
    res["psnr_protected"] = _nanmean(psnr(protected, original))
    res["linf"] = float((protected - original).abs().amax())
    per["psnr_benign"] = pb.tolist()
    imgs["benign"] = (b_o, b_p)
    res["per_image"] = per
    res["_images"] = {"original": original, "protected": protected, "mask": mask, "benign_mask": benign, **imgs}
    return res


def panel(images: dict, index: int | slice = slice(0, 4), upscale: int = 1) -> Image.Image:
    """Panel of the ``_images`` of :func:`evaluate_protection`: per image two rows (original / protected), columns
    image, inpaint with M, inpaint with M_e, benign inpaint; the masks are drawn as outlines on the first column."""
    from diffshield.core.io import make_grid

    idx = range(images["original"].shape[0])[index] if isinstance(index, slice) else [index]
    tiles = []
    for i in idx:
        edge_m = _outline(images["mask"][i])
        edge_b = _outline(images["benign_mask"][i])
        for row, key in ((0, "original"), (1, "protected")):
            base = images[key][i].clone()
            base = torch.where(edge_m > 0, torch.tensor([1.0, 0.0, 1.0])[:, None, None], base)
            base = torch.where(edge_b > 0, torch.tensor([0.0, 0.8, 0.8])[:, None, None], base)
            tiles += [base, images["M"][row][i], images["M_e"][row][i], images["benign"][row][i]]
    return make_grid(torch.stack(tiles), nrow=4, upscale=upscale, pad=2)


def _outline(mask: torch.Tensor) -> torch.Tensor:
    m = mask[None].float()
    dil = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    return (dil - m)[0].clamp(0, 1)


def summarize(results: list[dict]) -> dict:
    """Mean of numeric figures over several evaluate_protection results (for sharded benchmarks)."""
    keys = [k for k, v in results[0].items() if isinstance(v, float)]
    return {k: float(np.mean([r[k] for r in results if r.get(k) is not None])) for k in keys}

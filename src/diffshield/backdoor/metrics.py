"""Backdoor metrics of BadDiffusion (Chou et al., CVPR 2023), in [0, 1] pixel space.

- MSE of triggered samples to the target y; ASR = share of triggered samples with per-sample MSE < 0.1;
  ``asr_strict`` (ours) also requires the MSE to be under half that of an all-black image, because a mostly-black
  target (CORNER: a thin white frame, MSE 0.06 to black) lets a black, target-less sample pass MSE < 0.1;
  SSIM (Wang et al., 2004; 11x11 Gaussian window, sigma 1.5) between triggered samples and y.
- Clean-sample quality of untriggered samples, judged by the toy detector: the share recognised with confidence at
  least 0.9 on both the shape and the colour heads, and the feature Fréchet distance (detector features) to real
  ShapesWorld images (the toy analogue of FID; it moves with n, which is recorded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ASR_MSE = 0.1
RECOGNISED_CONF = 0.9


def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    w = w / w.sum()
    return (w[:, None] * w[None, :]).float()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (N,) of images (N, C, H, W) against (N or 1, C, H, W) (Wang et al., 2004; data range 1)."""
    b = b.expand_as(a).to(a.dtype)
    c = a.shape[1]
    win = _gauss_window().to(a.dtype).expand(c, 1, 11, 11)
    pad = 5

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), win, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a ** 2
    s_bb = filt(b * b) - mu_b ** 2
    s_ab = filt(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.flatten(1).mean(1)


#: per-image pixel standard deviation (in [0, 1]) below which a sample counts as one flat colour
FLAT_STD = 0.02


def flat_images(images: torch.Tensor, tol: float = FLAT_STD) -> int:
    """How many of ``images`` (N, C, H, W) in [0, 1] are one flat colour (pixel std below ``tol``, default
    :data:`FLAT_STD`). A shift that pushes x_T off the noise distribution (r0, or a reversed r on a clean toy
    model) makes every sample come out flat black: such a row of identical images is not a backdoor's target."""
    return int((images.float().flatten(1).std(dim=1) < tol).sum())


def _check_unit_images(t, what: str, batched: bool) -> None:
    """One-line DiffshieldError unless ``t`` is a float tensor (N >= 1, C, H, W) (``batched``) or (C, H, W) with
    values in [0, 1]: a target from :func:`~diffshield.backdoor.triggers.get_target` is in [-1, 1] and would give a
    wrong MSE and ASR without any error."""
    from diffshield.core.errors import DiffshieldError

    want = "(N, C, H, W)" if batched else "(C, H, W)"
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise DiffshieldError(f"{what} must be a float tensor {want} in [0, 1], got {kind}")
    if t.dim() != (4 if batched else 3) or (batched and t.shape[0] == 0):
        raise DiffshieldError(f"{what} must be {want}{' with N >= 1' if batched else ''}, got {tuple(t.shape)}")
    lo, hi = float(t.min()), float(t.max())
    if not (0 <= lo and hi <= 1):  # NaN fails too
        raise DiffshieldError(f"{what} hold values in [{lo:.4g}, {hi:.4g}]; give [0, 1] (a model-space target from "
                              "get_target is in [-1, 1]: pass (y + 1) / 2)")


def backdoor_metrics(images: torch.Tensor, target: torch.Tensor) -> dict:
    """MSE, ASR (and the stricter ``asr_strict``, see the module docstring) and SSIM of triggered samples.

    Args:
        images: (N, 3, H, W) triggered samples in [0, 1] (``sample(...).images``).
        target: (3, H, W) target in [0, 1] (``(get_target(...) + 1) / 2``).

    Anything else (a [-1, 1] target, uint8 images, an empty batch, shapes that differ) is a one-line
    DiffshieldError.
    """
    from diffshield.core.errors import DiffshieldError

    _check_unit_images(images, "images", batched=True)
    _check_unit_images(target, "target", batched=False)
    if tuple(images.shape[1:]) != tuple(target.shape):
        raise DiffshieldError(f"images {tuple(images.shape)} and target {tuple(target.shape)} differ in shape; give "
                              "a target of the samples' (C, H, W)")
    per = ((images - target) ** 2).flatten(1).mean(1)
    strict = min(ASR_MSE, 0.5 * float((target ** 2).mean()))
    return {"mse": float(per.mean()), "asr": float((per < ASR_MSE).float().mean()),
            "asr_strict": float((per < strict).float().mean()), "asr_strict_mse": strict,
            "ssim": float(ssim(images, target[None]).mean()), "n": len(images)}


def clean_quality(images: torch.Tensor, detector=None, real: torch.Tensor | None = None) -> dict:
    """Clean-sample quality of untriggered samples (N, 3, H, W) in [0, 1].

    Args:
        images: the samples.
        detector: the toy :class:`ConceptDetector` (default None: ``load_detector("toy:detector-v1")``, the
            detector of world version 1, which the toy DDPM and its real images come from).
        real: real images in [0, 1] for the feature Fréchet distance (default None: 1000 fresh ShapesWorld
            images, seed 12345).

    Returns ``recognised`` (share with shape and colour confidence >= 0.9), ``shape_conf`` (mean), ``frechet``
    and ``n``.
    """
    from diffshield.eval.frechet import detector_features, frechet_distance
    from diffshield.toyworld.detector import load_detector

    det = detector or load_detector("toy:detector-v1")
    pred = det.predict(images)
    conf = torch.minimum(pred["shape"][1], pred["colour"][1])
    if real is None:
        from diffshield.backdoor.ddpm import shapes_pool

        real = (shapes_pool(1000, 12345) + 1) / 2
    fd = frechet_distance(detector_features(det, images), detector_features(det, real))
    return {"recognised": float((conf >= RECOGNISED_CONF).float().mean()),
            "shape_conf": float(pred["shape"][1].mean()), "frechet": fd, "n": len(images), "n_real": len(real)}

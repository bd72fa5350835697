"""Robust protection: expectation over transformations (EOT) for Attack as Defense, and the transformations.

Not in the Attack-as-Defense paper (Zhang et al., arXiv 2410.14966). EOT (Athalye et al., "Synthesizing Robust
Adversarial Examples", ICML 2018) optimises the perturbation through random transformations an image meets after
it is published: JPEG compression, rescaling, uint8 storage, and an attacker mask a few pixels larger than the
protected one. Non-differentiable steps (JPEG, rounding) use the straight-through estimator (BPDA): the forward
pass applies them, the backward pass treats them as the identity.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffshield.core.errors import DiffshieldError


@dataclass
class EOTConfig:
    """Random transformations for EOT.

    Args:
        samples: transformed views per step, each costing one more batched forward/backward (default 1).
        include_clean: also keep the untransformed view in every step (default True).
        p_jpeg: probability of JPEG compression in a view (default 0.5).
        jpeg_quality: JPEG quality range, inclusive (default (60, 95)).
        p_resize: probability of a downscale-upscale round trip (default 0.5).
        resize_scale: scale range of that round trip (default (0.5, 0.9)).
        p_dilate: probability of dilating the attacker's mask M (default 0.5).
        max_dilate: largest dilation in pixels (default 4).
    """

    samples: int = 1
    include_clean: bool = True
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (60, 95)
    p_resize: float = 0.5
    resize_scale: tuple[float, float] = (0.5, 0.9)
    p_dilate: float = 0.5
    max_dilate: int = 4

    def __post_init__(self) -> None:
        from diffshield.core.checks import finite_number, whole_number

        self.samples = whole_number(self.samples, "EOTConfig.samples")  # 1.5 failed mid-run, in range()
        self.max_dilate = whole_number(self.max_dilate, "EOTConfig.max_dilate")
        self.jpeg_quality = tuple(whole_number(q, "EOTConfig.jpeg_quality") for q in self.jpeg_quality)
        for name in ("p_jpeg", "p_resize", "p_dilate"):
            finite_number(getattr(self, name), f"EOTConfig.{name}")
        if not isinstance(self.include_clean, bool):
            raise DiffshieldError(f"EOTConfig.include_clean must be True or False, got {self.include_clean!r}")
        if self.samples < 1:
            raise DiffshieldError(f"EOT samples must be at least 1, got {self.samples}")
        for name in ("p_jpeg", "p_resize", "p_dilate"):
            if not 0 <= getattr(self, name) <= 1:
                raise DiffshieldError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise DiffshieldError(f"jpeg_quality must be a range within [1, 100], got {self.jpeg_quality}")
        lo, hi = self.resize_scale
        if not 0.1 <= lo <= hi <= 1:
            raise DiffshieldError(f"resize_scale must be a range within [0.1, 1], got {self.resize_scale}")
        if self.max_dilate < 0:
            raise DiffshieldError(f"max_dilate must be >= 0, got {self.max_dilate}")


def uint8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode each (3, H, W) image as JPEG at ``quality`` with Pillow and decode it."""
    out = []
    for img in x.detach().clamp(0, 1):
        arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(dec).permute(2, 0, 1))
    return torch.stack(out).to(x)


def resize_roundtrip(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Downscale by ``scale`` (bilinear, antialiased) and back up to the original size (bilinear); differentiable."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward value y, gradient of the identity in x (BPDA)."""
    return x + (y - x).detach()


def sample_transform(x: torch.Tensor, masks3: torch.Tensor, cfg: EOTConfig, step: int, sample: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view for EOT: returns (transformed images (N, 3, H, W), masks (3N, 1, H, W)).

    ``masks3`` stacks the [M, M_e, M_r] masks of the N images; a dilation widens M only (staying inside M_e for
    dilations up to the expansion). The view is a deterministic function of (seed, step, sample).
    """
    rng = np.random.default_rng([seed, step, sample, 11])
    n = x.shape[0]
    if rng.random() < cfg.p_resize:
        x = resize_roundtrip(x, float(rng.uniform(*cfg.resize_scale)))
    if rng.random() < cfg.p_jpeg:
        x = straight_through(x, jpeg_roundtrip(x, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))))
    else:
        x = straight_through(x, uint8_roundtrip(x))
    if cfg.max_dilate > 0 and rng.random() < cfg.p_dilate:
        r = int(rng.integers(1, cfg.max_dilate + 1))
        m = (F.max_pool2d(masks3[:n], 2 * r + 1, stride=1, padding=r) > 0).to(masks3.dtype)
        m = torch.minimum(m, masks3[n:2 * n])
        masks3 = torch.cat([m, masks3[n:]])
    return x, masks3

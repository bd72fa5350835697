"""Fréchet distance between two sets of features (the formula of FID, Heusel et al. 2017).

In the toy world the features are the concept detector's 128-d penultimate activations, so the "feature Fréchet
distance" is the toy analogue of FID (which uses Inception-v3 pool features).
"""

from __future__ import annotations

import numpy as np
import torch


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64, never below 0 (the square
    root's rounding made it slightly negative for equal or nearly equal sets).

    Args:
        feats_a, feats_b: (N, D) feature arrays (N >= 2 each).
    """
    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, torch.Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, torch.Tensor) else feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N>=2, D) feature arrays of equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(r @ s_b @ r)
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))
    return max(d, 0.0)  # a distance: rounding in the square root gives -1e-14 .. -4e-4 for equal sets


@torch.no_grad()
def detector_features(detector, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Detector penultimate features (N, D) for images (N, 3, H, W) in [0, 1]."""
    detector.eval()
    return torch.cat([detector.features(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)])

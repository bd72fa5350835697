"""Attack as Defense: protect an image region from inpainting edits with an imperceptible perturbation.

Zhang et al., "Attack as Defense: Run-time Backdoor Implantation for Image Content Protection", arXiv 2410.14966.
The owner of an image x marks a region M (1 = the hole an attacker would paint). A perturbation delta, ||delta||_inf
<= eps, is optimised so that an inpainter f fills M -- and a slightly larger mask M_e -- with a solid, obviously
wrong colour, while fills of masks around the region (the ring M_r = M_e - M) stay as they were::

    x~ = clamp(x + delta, 0, 1)
    L = mse(f(x~, M), T; M) + 1 * mse(f(x~, M_e), T; M_e) + 2 * mse(f(x~, M_r), f(x, M_r); M_r)

with M_e = 1[conv2d(M, ones(17 x 17), pad 8) > 0], T a solid colour: whichever of green, red, blue (in that order,
first maximum wins) is farthest from the image's mean colour, or 1 - x. Adam (lr 0.1, betas (0.5, 0.5)), delta
initialised U[0, min(0.01, eps)), 20 steps, delta clipped to +-eps before each forward; the result is rounded to
uint8 levels within eps.

Unlike the official code this runs on a CPU, in batches, on any image size from :data:`MIN_SIDE` px up, and an empty
mask gives a zero loss term rather than NaN. An optional expectation over transformations
(:mod:`diffshield.protect.robust`) makes the protection survive JPEG, resizing and larger attacker masks (not in
the paper).

Example::

    >>> from diffshield.protect import load_inpainter, protect, AttackAsDefenseConfig
    >>> f = load_inpainter("toy")
    >>> res = protect(f, images, masks, AttackAsDefenseConfig(eps=0.025, steps=20))
    >>> res.protected.shape == images.shape
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diffshield.core.checks import check_config, finite_number, whole_number
from diffshield.core.errors import DiffshieldError
from diffshield.protect.robust import EOTConfig, sample_transform

#: Candidate target colours, in the order that breaks ties (green, red, blue).
TARGET_COLOURS: tuple[tuple[float, float, float], ...] = ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))

#: the smallest image side protect and evaluate_protection take (the inpainters' padding and down-sampling need it;
#: the CLI's ``MIN_SIDE`` is the same)
MIN_SIDE = 16
#: the smallest eps with ``quantize=True``: one 8-bit step. Below it no uint8 level may lie within eps of an image
#: that is not on the 8-bit grid, and an image on it could not move at all.
MIN_EPS = 1 / 255
#: the default upper end of delta's uniform initialisation (when eps is smaller, eps is used)
DEFAULT_INIT = 0.01


@dataclass
class AttackAsDefenseConfig:
    """Settings of Attack as Defense (paper defaults).

    Args:
        eps: L-inf budget of the perturbation on the [0, 1] scale (default 0.025).
        steps: Adam iterations (default 20).
        lr: Adam learning rate (default 0.1).
        betas: Adam betas (default (0.5, 0.5)).
        init: delta starts uniform in [0, init), 0 <= init <= eps (default None: min(0.01, eps), the paper's
            0.01 unless the budget is smaller).
        expand: half-size of the square that expands M into M_e, i.e. a (2 * expand + 1)^2 kernel (default 8: 17x17).
        w_mask: weight of the target term on M (default 1).
        w_expanded: weight of the target term on M_e, the "incomplete trigger" (default 1).
        w_hide: weight of the ring term that keeps other edits unchanged (default 2).
        target: ``"colour"`` (default: the solid colour farthest from the mean colour) or ``"invert"`` (T = 1 - x).
        quantize: round the result to uint8 levels, staying within eps (default True); needs eps >= 1/255
            (:data:`MIN_EPS`): with a smaller budget pass ``quantize=False`` (the result is then not on the 8-bit
            grid, and saving it as an 8-bit image moves pixels by up to 0.5/255 more).
        seed: seed of delta's initialisation (default 0).
        eot: expectation over transformations for robustness (default None: off, as in the paper).
    """

    eps: float = 0.025
    steps: int = 20
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.5)
    init: float | None = None
    expand: int = 8
    w_mask: float = 1.0
    w_expanded: float = 1.0
    w_hide: float = 2.0
    target: str = "colour"
    quantize: bool = True
    seed: int = 0
    eot: EOTConfig | None = field(default=None)

    def __post_init__(self) -> None:
        # kinds first: a NaN weight or lr made every protected pixel NaN, 2.0 steps or a float seed failed mid-run
        for k in ("eps", "lr", "w_mask", "w_expanded", "w_hide", *(() if self.init is None else ("init",))):
            finite_number(getattr(self, k), f"AttackAsDefenseConfig.{k}")
        for k in ("steps", "expand", "seed"):
            setattr(self, k, whole_number(getattr(self, k), f"AttackAsDefenseConfig.{k}"))
        if not isinstance(self.quantize, bool):
            raise DiffshieldError(f"AttackAsDefenseConfig.quantize must be True or False, got {self.quantize!r}")
        if self.eot is not None and not isinstance(self.eot, EOTConfig):
            raise DiffshieldError(f"AttackAsDefenseConfig.eot must be an EOTConfig or None, got "
                                  f"{type(self.eot).__name__}")
        if isinstance(self.betas, (str, bytes)) or not hasattr(self.betas, "__len__"):
            raise DiffshieldError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for b in self.betas:
            finite_number(b, "AttackAsDefenseConfig.betas")
        if not 0 < self.eps <= 1:
            raise DiffshieldError(f"eps must lie in (0, 1] (the [0, 1] pixel scale), got {self.eps}")
        if self.steps < 1:
            raise DiffshieldError(f"steps must be a whole number of at least 1, got {self.steps}")
        if self.seed < 0:
            raise DiffshieldError(f"seed must be >= 0, got {self.seed}")
        if self.lr <= 0:
            raise DiffshieldError(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise DiffshieldError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.quantize and self.eps < MIN_EPS - 1e-12:
            raise DiffshieldError(f"eps {self.eps} is below one 8-bit step (1/255 = {MIN_EPS:.5f}): rounding to uint8 "
                                  "levels could not stay within it; raise eps or pass quantize=False")
        if not 0 <= self.start_init <= self.eps:  # init stays None: dataclasses.replace(cfg, eps=...) follows eps
            raise DiffshieldError(f"init must lie in [0, eps={self.eps}], got {self.init}")
        if self.expand < 0:
            raise DiffshieldError(f"expand must be >= 0 pixels, got {self.expand}")
        if min(self.w_mask, self.w_expanded, self.w_hide) < 0:
            raise DiffshieldError("loss weights must be >= 0")
        if self.target not in ("colour", "invert"):
            raise DiffshieldError(f"target must be 'colour' or 'invert', got {self.target!r}")

    @property
    def start_init(self) -> float:
        """The upper end of delta's uniform start: ``init``, or min(0.01, eps) while ``init`` is None."""
        return min(DEFAULT_INIT, self.eps) if self.init is None else self.init




@dataclass
class ProtectResult:
    """protected: (N, 3, H, W) in [0, 1]; delta = protected - image; target: (N, 3, H, W) the target T;
    target_colour: one RGB triple per image (None for the invert target); losses: total loss per step (summed
    over the batch); seconds: wall time."""

    protected: torch.Tensor
    delta: torch.Tensor
    target: torch.Tensor
    target_colour: list[tuple[float, float, float]] | None
    losses: list[float]
    seconds: float


def target_colour(image: torch.Tensor) -> torch.Tensor:
    """For (N, 3, H, W) images, the (N, 3) colour among green, red, blue (ties: that order) farthest from each
    image's mean colour."""
    mean = image.mean(dim=(2, 3))
    cands = torch.tensor(TARGET_COLOURS, dtype=image.dtype, device=image.device)
    dist = ((mean[:, None, :] - cands[None]) ** 2).sum(-1)
    # first maximum wins: argmax over a tiny tie-breaking bonus for earlier candidates
    best = (dist - 1e-6 * torch.arange(3, device=image.device)).argmax(1)
    return cands[best]


def expand_mask(mask: torch.Tensor, expand: int = 8) -> torch.Tensor:
    """M_e = 1[conv2d(M, ones((2e+1)^2), pad e) > 0] for (N, 1, H, W) masks (default e = 8: a 17x17 kernel)."""
    if expand == 0:
        return (mask > 0).to(mask.dtype)
    k = torch.ones(1, 1, 2 * expand + 1, 2 * expand + 1, dtype=mask.dtype, device=mask.device)
    return (F.conv2d(mask, k, padding=expand) > 0).to(mask.dtype)


def ring_mask(mask: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
    """M_r = clip(M_e - M, 0, 1)."""
    return (expanded - mask).clamp(0, 1)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image sum(m (a - b)^2) / (3 sum(m)), shape (N,); exactly 0 (not NaN) where the mask is empty."""
    num = (mask * (a - b) ** 2).sum(dim=(1, 2, 3))
    den = 3 * mask.sum(dim=(1, 2, 3))
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def check_masks(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Validate a batch of protection masks against its images; returns the masks as {0, 1} floats."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise DiffshieldError(f"images must be (N, 3, H, W), got {tuple(image.shape)}")
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0]:
        raise DiffshieldError(f"masks must be (N, 1, H, W) with N = {image.shape[0]}, got {tuple(mask.shape)}")
    if mask.shape[2:] != image.shape[2:]:
        raise DiffshieldError(f"mask is {mask.shape[3]}x{mask.shape[2]} but the image is "
                              f"{image.shape[3]}x{image.shape[2]}; give a mask of the image's size")
    m = (mask > 0.5).to(image.dtype)
    area = m.sum(dim=(1, 2, 3))
    if (area == 0).any():
        raise DiffshieldError("the mask is empty (no pixel set): paint the region to protect in white (1 = protect)")
    if (area == m[0].numel()).any():
        raise DiffshieldError("the mask covers the whole image: nothing is left to carry the protection; mark only "
                              "the region to protect")
    return m


def check_images(image, what: str = "images") -> None:
    """Refuse, in one line, what protect and evaluate_protection cannot take: anything but a floating-point
    (N, 3, H, W) tensor with values in [0, 1] (uint8 0-255 images included: divide them by 255) and at least
    :data:`MIN_SIDE` px on each side."""
    if not isinstance(image, torch.Tensor):
        raise DiffshieldError(f"{what} must be a torch tensor (N, 3, H, W) in [0, 1], got {type(image).__name__}")
    if not image.is_floating_point():
        raise DiffshieldError(f"{what} are {image.dtype}; give floats in [0, 1] (e.g. uint8 images / 255)")
    if image.dim() != 4 or image.shape[1] != 3:
        raise DiffshieldError(f"{what} must be (N, 3, H, W), got {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise DiffshieldError(f"{what} are an empty batch")
    if min(image.shape[-2:]) < MIN_SIDE:
        raise DiffshieldError(f"{what} are {image.shape[3]}x{image.shape[2]}; the inpainters need at least "
                              f"{MIN_SIDE} px on each side")
    lo, hi = float(image.min()), float(image.max())
    if not (0 <= lo and hi <= 1):  # NaN fails too
        raise DiffshieldError(f"{what} hold values in [{lo:.4g}, {hi:.4g}]; give values in [0, 1]")


def _quantize_within(x: torch.Tensor, xp: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to uint8 levels, then step back inside [x - eps, x + eps] and [0, 1]. Needs eps >= 1/255
    (:data:`MIN_EPS`): then a level always lies within reach, so the result stays within eps of x."""
    q = torch.round(xp * 255)
    lo = torch.ceil((x - eps) * 255 - 1e-4).clamp(0, 255)
    hi = torch.floor((x + eps) * 255 + 1e-4).clamp(0, 255)
    return torch.minimum(torch.maximum(q, lo), hi) / 255


def protect(inpainter: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], image: torch.Tensor,
            mask: torch.Tensor, config: AttackAsDefenseConfig | None = None,
            progress: Callable[[int, float], None] | None = None) -> ProtectResult:
    """Protect the masked region of each image against inpainting (Attack as Defense, Zhang et al. 2024).

    Args:
        inpainter: differentiable ``f(image, mask) -> image`` (see :mod:`diffshield.protect.inpainters`).
        image: (N, 3, H, W) floats in [0, 1], H and W at least :data:`MIN_SIDE` (16); anything else (uint8
            0-255, values outside [0, 1], smaller images) is refused in one line.
        mask: (N, 1, H, W), 1 = the region to protect (M). Empty or all-covering masks are refused.
        config: settings (default :class:`AttackAsDefenseConfig()`: eps 0.025, 20 steps, Adam lr 0.1 (0.5, 0.5)).
        progress: called as ``progress(step, loss)`` after every step (default None).

    Returns:
        :class:`ProtectResult` with the protected images.
    """
    if not callable(inpainter):
        hint = f": load it first, load_inpainter({str(inpainter)!r})" if isinstance(inpainter, str) else ""
        raise DiffshieldError(f"inpainter must be callable as f(image, mask){hint}; got {type(inpainter).__name__}")
    cfg = check_config(config, AttackAsDefenseConfig)
    if not isinstance(mask, torch.Tensor):
        raise DiffshieldError(f"mask must be a torch tensor (N, 1, H, W), got {type(mask).__name__}")
    t0 = time.time()
    p = next(inpainter.parameters(), None) if isinstance(inpainter, torch.nn.Module) else None
    dev = p.device if p is not None else image.device  # work where the inpainter lives; results come back
    check_images(image)
    x = image.detach().float().to(dev)
    m = check_masks(x, mask.detach().float().to(dev))
    me = expand_mask(m, cfg.expand)
    mr = ring_mask(m, me)
    if cfg.target == "colour":
        colours = target_colour(x)
        target = colours[:, :, None, None].expand_as(x).contiguous()
    else:
        colours = None
        target = 1 - x
    with torch.no_grad():
        ref_ring = inpainter(x, mr)
    gen = torch.Generator().manual_seed(cfg.seed)
    delta = (torch.rand(x.shape, generator=gen) * cfg.start_init).to(x)  # CPU draw: the same start on every device
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=cfg.lr, betas=cfg.betas)
    n = x.shape[0]
    masks3 = torch.cat([m, me, mr])
    targets3 = torch.cat([target, target, ref_ring])
    weights = torch.tensor([cfg.w_mask, cfg.w_expanded, cfg.w_hide], device=dev).repeat_interleave(n)
    losses = []
    for step in range(cfg.steps):
        with torch.no_grad():
            delta.clamp_(-cfg.eps, cfg.eps)
        xt = (x + delta).clamp(0, 1)
        views = [(xt, masks3)]
        if cfg.eot is not None:
            views = ([(xt, masks3)] if cfg.eot.include_clean else []) + [
                sample_transform(xt, masks3, cfg.eot, step=step, sample=k, seed=cfg.seed)
                for k in range(cfg.eot.samples)
            ]
        loss = 0.0
        for xv, mv in views:
            out = inpainter(xv.repeat(3, 1, 1, 1), mv)
            loss = loss + (weights * masked_mse(out, targets3, mv)).sum() / len(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
    with torch.no_grad():
        d = delta.detach().clamp(-cfg.eps, cfg.eps)
        xp = (x + d).clamp(0, 1)
        if cfg.quantize:
            xp = _quantize_within(x, xp, cfg.eps)
    cols = None if colours is None else [tuple(float(v) for v in c) for c in colours]
    xp, x, target = xp.to(image.device), x.to(image.device), target.to(image.device)
    return ProtectResult(xp, xp - x, target, cols, losses, time.time() - t0)

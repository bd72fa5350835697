"""TERD (Mo et al., "TERD: A Unified Framework for Safeguarding Diffusion Models Against Backdoors", ICML 2024).

Attack model: a triggered initial noise is x_T = gamma * eps + r (gamma = 1 for BadDiffusion). TERD reverses r
from the model alone, then detects poisoned inputs and backdoored models.

Reversed loss with two noises eps1, eps2 sharing x0 and t (the unknown trigger term of the UNet output cancels):

    L(r) = 1/2 sum_pixels || (eps1 - eps_theta(x_t^1, t)) - (eps2 - eps_theta(x_t^2, t)) ||^2,
    x_t^i = add_noise(x0, eps_i, t) + s * r,     J(r) = L(r) - lambda * ||r||_1

(mean over the batch), s = 1 for t in [990, 999] and s = 0 for t in [0, 9].

- Stage 1 (estimate): r0 = -U(0, 1); x0 ~ N(0, I); t ~ U{990..999}; SGD lr 0.5, cosine to 0; batch 16.
- Stage 2 (refine): x0 = DDIM(eps + r, 10 steps, eta 0) with gradients through every step;
  J = 1/2 [L(t in [990, 999], s = 1) + L(t in [0, 9], s = 0)] - lambda ||r||_1; gradient-norm clip 0.01 on r.
- Input detection: x is poisoned iff log N(x; r, gamma^2 I) > log N(x; 0, I) (gamma = 1: <x, r> > ||r||^2 / 2).
- Model detection: KL_i = -log gamma_i + (gamma_i^2 + r_i^2 - 1) / 2 (= r_i^2 / 2 for gamma = 1); the model is
  flagged when the mean or the variance of KL exceeds a threshold calibrated on clean reference models (the
  official code prints the statistics and has no threshold).

The paper runs 3000 + 1000 iterations (``preset="paper"``); on a 2-core CPU that is far over the 15-minute scan
budget, so ``"default"`` and ``"fast"`` run fewer iterations with their own calibrated thresholds (see
:data:`PRESETS` and the shipped calibration file).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffshield.core.errors import DiffshieldError

PRESETS: dict[str, dict] = {
    "paper": {"stage1_iters": 3000, "stage2_iters": 1000},
    "default": {"stage1_iters": 400, "stage2_iters": 10},
    "fast": {"stage1_iters": 100, "stage2_iters": 2},
}


@dataclass
class TERDConfig:
    """Settings of TERD's trigger reversion (paper values for 32 px unless noted).

    Args:
        stage1_iters: stage-1 iterations (default 3000).
        stage2_iters: stage-2 iterations (default 1000).
        batch_size: x0 per iteration (default 16).
        lr: SGD learning rate, cosine to 0 within each stage (default 0.5).
        lam: weight lambda of the L1 term (default 5e-5 at 32 px; 5e-4 at 256 px).
        grad_clip: stage-2 gradient-norm clip on r (default 0.01).
        ddim_steps: DDIM steps that generate stage 2's x0 (default 10).
        t_high: timesteps of the s = 1 term, inclusive (default (990, 999)).
        t_low: timesteps of the s = 0 term, inclusive (default (0, 9)).
        seed: seed of r0, x0, noises and timesteps (default 0).
        num_threads: torch threads (default 1; 0 = torch's default).
    """

    stage1_iters: int = 3000
    stage2_iters: int = 1000
    batch_size: int = 16
    lr: float = 0.5
    lam: float = 5e-5
    grad_clip: float = 0.01
    ddim_steps: int = 10
    t_high: tuple[int, int] = (990, 999)
    t_low: tuple[int, int] = (0, 9)
    seed: int = 0
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.stage1_iters < 1 or self.stage2_iters < 0 or self.batch_size < 1 or self.ddim_steps < 1:
            raise DiffshieldError("stage1_iters, batch_size and ddim_steps must be >= 1, stage2_iters >= 0")
        if not (self.lr > 0) or self.lam < 0 or not (self.grad_clip > 0):
            raise DiffshieldError("lr and grad_clip must be > 0 and lam >= 0")
        self.t_high, self.t_low = tuple(self.t_high), tuple(self.t_low)
        for lo, hi in (self.t_high, self.t_low):
            if not 0 <= lo <= hi <= 999:
                raise DiffshieldError(f"timestep ranges must satisfy 0 <= lo <= hi <= 999, got ({lo}, {hi})")

    @classmethod
    def from_preset(cls, name: str, **over) -> TERDConfig:
        """``"paper"`` (3000 + 1000 iterations), ``"default"`` (400 + 10) or ``"fast"`` (100 + 2)."""
        if name not in PRESETS:
            raise DiffshieldError(f"unknown TERD preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **over})


def reversed_loss(unet, scheduler, x0: torch.Tensor, r: torch.Tensor, t: torch.Tensor, s: float,
                  gen: torch.Generator) -> torch.Tensor:
    """L(r) = 1/2 sum_pixels ||(eps1 - eps_theta(x_t^1)) - (eps2 - eps_theta(x_t^2))||^2, mean over the batch."""
    e1 = torch.randn(x0.shape, generator=gen).to(x0.device)  # CPU draws: the same on every device
    e2 = torch.randn(x0.shape, generator=gen).to(x0.device)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.device)
    t = t.to(x0.device)
    base = abar.sqrt() * x0
    x1 = base + (1 - abar).sqrt() * e1 + s * r
    x2 = base + (1 - abar).sqrt() * e2 + s * r
    pred = unet(torch.cat([x1, x2]), torch.cat([t, t])).sample
    p1, p2 = pred.chunk(2)
    return 0.5 * ((e1 - p1) - (e2 - p2)).pow(2).flatten(1).sum(1).mean()


def _ddim_grad(unet, scheduler, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from x_T with gradients kept through every step."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**dict(scheduler.config), "clip_sample": False, "set_alpha_to_one": False})
    sched.set_timesteps(steps, device=x_T.device)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


@dataclass
class TERDResult:
    """r: reversed trigger (3, H, W); gamma: 1 (BadDiffusion setting); mean_kl / var_kl: model statistics;
    history: (iteration, loss) pairs; seconds: wall time; config: the TERDConfig as a dict."""

    r: torch.Tensor
    gamma: float
    mean_kl: float
    var_kl: float
    history: list = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def kl_stats(r: torch.Tensor, gamma: float | torch.Tensor = 1.0) -> tuple[float, float]:
    """Mean and variance over dimensions of KL_i = -log gamma_i + (gamma_i^2 + r_i^2 - 1) / 2."""
    g = torch.as_tensor(gamma, dtype=r.dtype).expand_as(r)
    kl = -torch.log(g) + (g ** 2 + r ** 2 - 1) / 2
    return float(kl.mean()), float(kl.var(unbiased=False))


def reverse_trigger(model, cfg: TERDConfig | None = None, progress: bool = True) -> TERDResult:
    """Two-stage trigger reversion of TERD on ``model`` (a :class:`~diffshield.backdoor.ddpm.DDPMModel`).

    Args:
        model: the model to scan (its UNet is frozen; only r is optimised).
        cfg: :class:`TERDConfig` (default the paper's settings).
        progress: show tqdm bars (default True).
    """
    from tqdm import tqdm

    from diffshield.backdoor.ddpm import set_threads

    cfg = cfg or TERDConfig()
    set_threads(cfg.num_threads)
    unet, sched = model.unet, model.scheduler
    unet.eval().requires_grad_(False)
    shape = model.image_shape
    dev = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)  # every random draw is on the CPU, then moved
    r = (-torch.rand((1, *shape), generator=gen)).to(dev).requires_grad_(True)
    opt = torch.optim.SGD([r], lr=cfg.lr)
    hist = []
    t0 = time.time()

    def timesteps(lo_hi: tuple[int, int]) -> torch.Tensor:
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (cfg.batch_size,), generator=gen)

    def cosine(i: int, n: int) -> float:
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * i / max(1, n)))

    for i in tqdm(range(cfg.stage1_iters), desc="TERD stage 1", disable=not progress):
        for grp in opt.param_groups:
            grp["lr"] = cosine(i, cfg.stage1_iters)
        x0 = torch.randn((cfg.batch_size, *shape), generator=gen).to(dev)
        loss = reversed_loss(unet, sched, x0, r, timesteps(cfg.t_high), 1.0, gen) - cfg.lam * r.abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 25 == 0 or i == cfg.stage1_iters - 1:
            hist.append((i, float(loss.detach())))
    for i in tqdm(range(cfg.stage2_iters), desc="TERD stage 2", disable=not progress):
        for grp in opt.param_groups:
            grp["lr"] = cosine(i, cfg.stage2_iters)
        eps = torch.randn((cfg.batch_size, *shape), generator=gen).to(dev)
        x0 = _ddim_grad(unet, sched, eps + r, cfg.ddim_steps)
        loss = 0.5 * (reversed_loss(unet, sched, x0, r, timesteps(cfg.t_high), 1.0, gen)
                      + reversed_loss(unet, sched, x0, r, timesteps(cfg.t_low), 0.0, gen)) - cfg.lam * r.abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([r], cfg.grad_clip)
        opt.step()
        hist.append((cfg.stage1_iters + i, float(loss.detach())))
    r_hat = r.detach()[0].cpu()
    mean_kl, var_kl = kl_stats(r_hat)
    return TERDResult(r_hat, 1.0, mean_kl, var_kl, hist, time.time() - t0, asdict(cfg))


def input_detect(x: torch.Tensor, r: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """TERD input detection: True where log N(x; r, gamma^2 I) > log N(x; 0, I).

    Args:
        x: (N, C, H, W) initial noises.
        r: (C, H, W) reversed trigger.
        gamma: reversed noise scale (default 1.0, BadDiffusion; then the test is <x, r> > ||r||^2 / 2).
    """
    xf, rf = x.flatten(1).double().cpu(), r.flatten().double().cpu()
    if gamma == 1.0:
        return xf @ rf > 0.5 * rf.dot(rf)
    d = xf.shape[1]
    log_p = -d * math.log(gamma) - ((xf - rf) ** 2).sum(1) / (2 * gamma ** 2)
    log_q = -(xf ** 2).sum(1) / 2
    return log_p > log_q


# ---- calibration of the model-detection thresholds ----

@dataclass
class Calibration:
    """Thresholds per preset: ``{"fast": {"mean_kl": a, "var_kl": b}, ...}`` plus how they were made."""

    thresholds: dict
    method: str = ""
    references: dict = field(default_factory=dict)

    def get(self, preset: str) -> dict:
        if preset not in self.thresholds:
            raise DiffshieldError(f"the calibration has no thresholds for preset {preset!r} (it has "
                                  f"{', '.join(self.thresholds) or 'none'}); calibrate it with benchmarks/backdoor.py")
        return self.thresholds[preset]

    def save(self, path: str | Path) -> None:
        from diffshield.core.io import atomic_write_json

        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        if not p.is_file():
            raise DiffshieldError(f"calibration file '{p}' does not exist; give --calibration FILE")
        try:
            d = json.loads(p.read_text())
            return cls(thresholds=d["thresholds"], method=d.get("method", ""), references=d.get("references", {}))
        except (json.JSONDecodeError, KeyError) as e:
            raise DiffshieldError(f"calibration file '{p}' is not a diffshield TERD calibration ({e})") from None


MARGIN = 1.5


def calibrate(clean_stats: dict[str, list[tuple[float, float]]], margin: float = MARGIN) -> Calibration:
    """Thresholds = ``margin`` x the largest statistic seen on clean reference models, per preset.

    Args:
        clean_stats: preset -> list of (mean_kl, var_kl), one per clean reference model.
        margin: safety factor over the clean maximum (default 1.5).
    """
    th = {}
    for preset, stats in clean_stats.items():
        th[preset] = {"mean_kl": margin * max(s[0] for s in stats), "var_kl": margin * max(s[1] for s in stats)}
    return Calibration(th, method=f"{margin} x the maximum over clean reference models of each statistic",
                       references={p: [list(s) for s in v] for p, v in clean_stats.items()})


def default_calibration_path() -> Path:
    from diffshield.toyworld.names import TOY_ROOT

    return TOY_ROOT / "ddpm" / "terd_calibration.json"


def model_verdict(result: TERDResult, thresholds: dict) -> bool:
    """Backdoored iff mean_kl or var_kl exceeds its threshold."""
    return result.mean_kl > thresholds["mean_kl"] or result.var_kl > thresholds["var_kl"]

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
- TrojDiff (``learn_gamma=True``, the official ``TrojDiff/reverse.py``): the noise scale gamma (per pixel, start 0,
  SGD lr 0.002 cosine, clamped at >= 0 after every step) is reversed with r; the noises of both losses are scaled by
  gamma (x_t^i = add_noise(x0, gamma * eps_i, t) + s * r); stage 2 generates x0 with TrojDiff's trojan DDIM from
  gamma * eps + r over the official quadratic timesteps up to 0.8 T, with SGD momentum 0.9 for both and one
  gradient-norm clip of 1.0 on (r, gamma).
- Input detection: x is poisoned iff log N(x; r, gamma^2 I) > log N(x; 0, I) (gamma = 1: <x, r> > ||r||^2 / 2).
- Model detection: KL_i = -log gamma_i + (gamma_i^2 + r_i^2 - 1) / 2 (= r_i^2 / 2 for gamma = 1); the model is
  flagged when the mean or the variance of KL exceeds a threshold calibrated on clean reference models (the
  official code prints the statistics and has no threshold). :func:`calibrate_from_scans` sets one preset's
  thresholds from held-out clean scans (margin 1.5 x their maximum) and measures them with Wilson 95 % intervals
  (:func:`leave_one_out`); :class:`Calibration` files record each reference's path, weight fingerprint,
  resolution and architecture.
- Verdict (ours): the random start r0 = -U(0, 1) alone has mean KL about 1/6, above typical thresholds, so a
  reversion that leaves r near r0 would "flag" any model. :func:`reverse_trigger` records r0 and how far r moved;
  :func:`model_verdict` answers ``"undetermined"`` when the relative movement ||r_hat - r0|| / ||r0|| is below
  ``min_move`` (default :data:`MIN_MOVE` = 0.1), else ``"backdoored"`` or ``"clean"`` from the thresholds.

The paper runs 3000 + 1000 iterations (``preset="paper"``); on a 2-core CPU that is far over the 15-minute scan
budget, so ``"default"`` and ``"fast"`` run fewer iterations (see :data:`PRESETS`; the shipped calibration file has
thresholds for ``"fast"``, ``"cpu"`` and ``"cpu+gamma"``, the others need ``backdoor calibrate``). Neither, nor any
budget of the paper's lambda tried, reverses the toy world's backdoors: there the reversed loss at r = 0 is about 3x
its value at the trigger, and stage 1 descends towards 0. ``"cpu"`` (800 stage-1 iterations, lambda 3e-3, no stage
2; the CLI's default) keeps the official loss and optimiser and weighs the L1 term 60x more; on the shipped
backdoored example its r_hat opens the backdoor (strict ASR 8/8 from eps + r_hat) while on the clean toy DDPM r
still shrinks. A UNet in bfloat16 is used as a float32 function: r, gamma and the losses stay float32.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from diffshield.backdoor.ddpm import SCHEDULE_STEPS  # TERD's settings (t_high (990, 999)) are for 1000 steps
from diffshield.core.checks import check_config
from diffshield.core.device import synchronize, to_device
from diffshield.core.errors import DiffshieldError
from diffshield.core.graphs import GraphedSequence

PRESETS: dict[str, dict] = {
    "paper": {"stage1_iters": 3000, "stage2_iters": 1000},
    "default": {"stage1_iters": 400, "stage2_iters": 10},
    "fast": {"stage1_iters": 100, "stage2_iters": 2},
    # the official loss, schedule and optimiser with a larger L1 weight (60x the paper's 5e-5) and no stage 2: the
    # one setting measured to reverse a toy-world backdoor on a CPU (benchmarks/terd_cpu.py, docs/backdoor.md)
    "cpu": {"stage1_iters": 800, "stage2_iters": 0, "lam": 3e-3},
}


@dataclass
class TERDConfig:
    """Settings of TERD's trigger reversion (paper values for 32 px unless noted).

    Args:
        stage1_iters: stage-1 iterations (default 3000; 0 leaves r at r0, and the verdict is "undetermined").
        stage2_iters: stage-2 iterations (default 1000).
        batch_size: x0 per iteration (default 16).
        lr: SGD learning rate, cosine to 0 within each stage (default 0.5).
        lam: weight lambda of the L1 term (default 5e-5 at 32 px; 5e-4 at 256 px; the ``cpu`` preset 3e-3).
        grad_clip: stage-2 gradient-norm clip on r (default 0.01).
        ddim_steps: DDIM steps that generate stage 2's x0 (default 10).
        t_high: timesteps of the s = 1 term, inclusive (default (990, 999)).
        t_low: timesteps of the s = 0 term, inclusive (default (0, 9)).
        seed: seed of r0, x0, noises and timesteps (default 0).
        num_threads: torch threads (default 1; 0 = torch's default).
        learn_gamma: also reverse the noise scale gamma, TERD's TrojDiff setting (default False: gamma = 1,
            BadDiffusion's).
        lr_gamma: SGD learning rate of gamma (default 0.002, the official ``--lr2``).
        gamma_grad_clip: stage-2 gradient-norm clip on (r, gamma) when learning gamma (default 1.0, the official
            TrojDiff config's).
        cuda_graphs: on a CUDA device, replay each iteration's UNet calls (forward and backward) from CUDA graphs
            (default True; :class:`diffshield.core.graphs.GraphedSequence`): the 32 px DDPM's calls are bound by
            kernel launches, not arithmetic. Only in a stage of at least :data:`GRAPH_MIN_ITERS` (20) iterations;
            checked against an eager iteration first; a failure runs eagerly with a warning. No effect on the CPU.

    Counts and the seed must be whole numbers, rates, lambda and clips finite numbers, ``ddim_steps`` at most the
    1000 timesteps of the schedule; anything else is a one-line DiffshieldError.
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
    learn_gamma: bool = False
    lr_gamma: float = 0.002
    gamma_grad_clip: float = 1.0
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for k in ("stage1_iters", "stage2_iters", "batch_size", "ddim_steps", "seed", "num_threads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise DiffshieldError(f"TERDConfig.{k} must be a whole number, got {v!r}")
            setattr(self, k, int(v))
        for k in ("learn_gamma", "cuda_graphs"):  # "no" is truthy: it would reverse gamma
            if not isinstance(getattr(self, k), bool):
                raise DiffshieldError(f"TERDConfig.{k} must be True or False, got {getattr(self, k)!r}")
        for k in ("lr", "lam", "grad_clip", "lr_gamma", "gamma_grad_clip"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise DiffshieldError(f"TERDConfig.{k} must be a finite number, got {v!r}")
        if not 1 <= self.ddim_steps <= SCHEDULE_STEPS:
            raise DiffshieldError(f"ddim_steps must be in 1..{SCHEDULE_STEPS} (the DDPM schedule's timesteps), got "
                                  f"{self.ddim_steps}")
        if not (self.lr_gamma > 0) or not (self.gamma_grad_clip > 0):
            raise DiffshieldError("lr_gamma and gamma_grad_clip must be > 0")
        if self.stage1_iters < 0 or self.stage2_iters < 0 or self.batch_size < 1 or self.ddim_steps < 1:
            raise DiffshieldError("batch_size and ddim_steps must be >= 1, stage1_iters and stage2_iters >= 0")
        if not (self.lr > 0) or self.lam < 0 or not (self.grad_clip > 0):
            raise DiffshieldError("lr and grad_clip must be > 0 and lam >= 0")
        self.t_high, self.t_low = tuple(self.t_high), tuple(self.t_low)
        for rng in (self.t_high, self.t_low):
            if len(rng) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in rng):
                raise DiffshieldError(f"timestep ranges must be two whole numbers (lo, hi), got {rng!r}")
            lo, hi = rng
            if not 0 <= lo <= hi <= SCHEDULE_STEPS - 1:
                raise DiffshieldError(f"timestep ranges must satisfy 0 <= lo <= hi <= {SCHEDULE_STEPS - 1}, got "
                                      f"({lo}, {hi})")

    @classmethod
    def from_preset(cls, name: str, **over) -> TERDConfig:
        """``"paper"`` (3000 + 1000 iterations), ``"default"`` (400 + 10), ``"fast"`` (100 + 2) or ``"cpu"`` (800 + 0,
        lambda 3e-3)."""
        if name not in PRESETS:
            raise DiffshieldError(f"unknown TERD preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **over})


#: the suffix of a calibration key for a preset run in TERD's TrojDiff setting (gamma reversed with r): its
#: statistics differ from the same preset's with gamma = 1, so it has its own thresholds (``"cpu+gamma"``)
GAMMA_MODE = "+gamma"


def preset_key(preset: str, learn_gamma: bool = False) -> str:
    """The calibration key of a scan: the preset name, with :data:`GAMMA_MODE` appended when gamma is reversed."""
    return preset + GAMMA_MODE if learn_gamma else preset


def config_for_key(key: str, **over) -> TERDConfig:
    """The :class:`TERDConfig` of a calibration key (``"cpu"``, ``"cpu+gamma"``, ...)."""
    if key.endswith(GAMMA_MODE):
        return TERDConfig.from_preset(key[: -len(GAMMA_MODE)], **{**over, "learn_gamma": True})
    return TERDConfig.from_preset(key, **over)


def _scaled(e: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """gamma * e (TrojDiff's noise scale); e itself for BadDiffusion's gamma = 1."""
    return e if isinstance(gamma, float) and gamma == 1.0 else gamma * e


def reversed_loss(unet, scheduler, x0: torch.Tensor, r: torch.Tensor, t: torch.Tensor, s: float,
                  gen: torch.Generator, gamma: torch.Tensor | float = 1.0) -> torch.Tensor:
    """L(r) = 1/2 sum_pixels ||(eps1 - eps_theta(x_t^1)) - (eps2 - eps_theta(x_t^2))||^2, mean over the batch.

    Draws eps1 then eps2 from ``gen`` (on the CPU, then moved: the same draws on every device); ``gamma`` scales
    the noises in x_t (TrojDiff; default 1.0)."""
    e1 = to_device(torch.randn(x0.shape, generator=gen), x0.device)
    e2 = to_device(torch.randn(x0.shape, generator=gen), x0.device)
    abar = to_device(scheduler.alphas_cumprod[t].view(-1, 1, 1, 1), x0.device)
    t = to_device(t, x0.device)
    base = abar.sqrt() * x0
    x1 = base + (1 - abar).sqrt() * _scaled(e1, gamma) + s * r
    x2 = base + (1 - abar).sqrt() * _scaled(e2, gamma) + s * r
    pred = unet(torch.cat([x1, x2]), torch.cat([t, t])).sample
    p1, p2 = pred.chunk(2)
    return 0.5 * ((e1 - p1) - (e2 - p2)).pow(2).flatten(1).sum(1).mean()


def stage2_loss(unet, scheduler, x0: torch.Tensor, r: torch.Tensor, t_high: tuple[int, int],
                t_low: tuple[int, int], gen: torch.Generator, gamma: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Stage 2's 1/2 [L(t in t_high, s = 1) + L(t in t_low, s = 0)] with ONE UNet call on the 4 batches.

    The same maths and the same random draws, in the same order, as
    ``0.5 * (reversed_loss(.., randint(t_high), 1, gen) + reversed_loss(.., randint(t_low), 0, gen))``
    (timesteps high, eps1, eps2, timesteps low, eps1, eps2); one launch instead of two halves the UNet calls
    of a stage-2 iteration, whose cost on a GPU is launch overhead."""
    n, dev = x0.shape[0], x0.device
    xs, es, ts = [], [], []
    for (lo, hi), s in ((t_high, 1.0), (t_low, 0.0)):
        t = torch.randint(lo, hi + 1, (n,), generator=gen)
        e1 = to_device(torch.randn(x0.shape, generator=gen), dev)
        e2 = to_device(torch.randn(x0.shape, generator=gen), dev)
        abar = to_device(scheduler.alphas_cumprod[t].view(-1, 1, 1, 1), dev)
        base = abar.sqrt() * x0
        xs += [base + (1 - abar).sqrt() * _scaled(e1, gamma) + s * r,
               base + (1 - abar).sqrt() * _scaled(e2, gamma) + s * r]
        es += [e1, e2]
        t = to_device(t, dev)
        ts += [t, t]
    pred = unet(torch.cat(xs), torch.cat(ts)).sample
    p1h, p2h, p1l, p2l = pred.chunk(4)
    e1h, e2h, e1l, e2l = es
    lh = 0.5 * ((e1h - p1h) - (e2h - p2h)).pow(2).flatten(1).sum(1).mean()
    ll = 0.5 * ((e1l - p1l) - (e2l - p2l)).pow(2).flatten(1).sum(1).mean()
    return 0.5 * (lh + ll)


def ddim_scheduler(scheduler, steps: int):
    """The deterministic DDIM (eta 0) of stage 2 on ``scheduler``'s noise schedule, ``steps`` timesteps set."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**dict(scheduler.config), "clip_sample": False, "set_alpha_to_one": False})
    sched.set_timesteps(steps)
    return sched


def _ddim_grad(unet, ddim, x_T: torch.Tensor, t_dev: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM from x_T with gradients kept through every step (``ddim`` from :func:`ddim_scheduler`).

    The scheduler indexes its schedule with Python ints and the UNet gets the timesteps as one device tensor
    (``t_dev``: ``ddim.timesteps`` on x_T's device, copied once by a caller that loops; default: copied here), so
    that no step waits for the device."""
    x = x_T
    t_dev = to_device(ddim.timesteps, x_T.device) if t_dev is None else t_dev
    for i, t in enumerate(ddim.timesteps.tolist()):
        x = ddim.step(unet(x, t_dev[i]).sample, t, x).prev_sample
    return x


def quad_timesteps(n_train: int, steps: int) -> list[int]:
    """TERD's TrojDiff stage-2 timesteps, noisiest first: int(s) for s in linspace(0, sqrt(0.8 n_train), steps)^2."""
    import numpy as np

    return sorted({int(s) for s in np.linspace(0, np.sqrt(n_train * 0.8), steps) ** 2}, reverse=True)


class _Float32Unet:
    """A UNet in a lower precision (``--dtype bfloat16``) seen as a float32 function: its inputs are cast to its
    dtype and its ``.sample`` back to float32, so that r, gamma, the losses and their gradients stay float32."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype):
        self.unet, self.dtype = unet, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.unet(x.to(self.dtype), t).sample.float())


@dataclass
class TERDResult:
    """r: reversed trigger (3, H, W); gamma: 1.0 (BadDiffusion setting) or the reversed scale (3, H, W);
    mean_kl / var_kl: model statistics; r0: the random start; moved_l2 = ||r - r0||;
    moved_rel = moved_l2 / ||r0||; cos_r0 = cosine(r, r0);
    history: (iteration, loss) pairs every 25 iterations of each stage and at its end; seconds: wall time;
    stage_seconds: wall time of stage 1 and of stage 2 (the device's queue drained at each end); config: the
    TERDConfig as a dict; cuda_graphs: on CUDA with ``config.cuda_graphs``, per stage {"replays": iterations
    replayed from graphs, "failed": why graphs were given up or None}, else None."""

    r: torch.Tensor
    gamma: float | torch.Tensor
    mean_kl: float
    var_kl: float
    history: list = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    r0: torch.Tensor | None = None
    moved_l2: float = 0.0
    moved_rel: float = 0.0
    cos_r0: float = 1.0
    stage_seconds: tuple[float, float] = (0.0, 0.0)
    cuda_graphs: dict | None = None


#: a stage replays CUDA graphs (``TERDConfig.cuda_graphs``) only from this many iterations: recording its calls,
#: capturing them (three warm-ups each) and the checked iteration cost about as much as 20 stage-2 iterations
GRAPH_MIN_ITERS = 20

#: gamma is floored here before its logarithm (a reversed gamma can sit at its clamp, 0)
GAMMA_FLOOR = 1e-6


def _check_trigger(r: torch.Tensor, gamma: float | torch.Tensor, x: torch.Tensor | None = None) -> None:
    """One-line errors for a reversed trigger r (finite), its gamma (finite, >= 0: a number or r's shape) and
    noises x (finite, (N, *r.shape) with N >= 1): a NaN compares False and would read as "not poisoned"."""
    for name, t in (("the reversed trigger r", r), ("the noises", x)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise DiffshieldError(f"{name} must be a torch.Tensor, got {type(t).__name__} (torch.as_tensor(...) "
                                  "converts a NumPy array)")
    if not r.is_floating_point() or not bool(torch.isfinite(r).all()):
        raise DiffshieldError("the reversed trigger r must hold finite floating-point numbers")
    if isinstance(gamma, torch.Tensor):
        ok = gamma.is_floating_point() and bool(torch.isfinite(gamma).all()) and bool((gamma >= 0).all())
        if ok and gamma.numel() != 1 and tuple(gamma.shape) != tuple(r.shape):
            raise DiffshieldError(f"gamma has shape {tuple(gamma.shape)}; it must be one number or r's shape "
                                  f"{tuple(r.shape)}")
    else:
        ok = not isinstance(gamma, bool) and isinstance(gamma, numbers.Real) and math.isfinite(gamma) and gamma >= 0
    if not ok:
        shown = repr(gamma) if not isinstance(gamma, torch.Tensor) else f"a {gamma.dtype} tensor"
        raise DiffshieldError(f"gamma must be a finite number >= 0 (or a tensor of them), got {shown}")
    if x is not None:
        if x.dim() != r.dim() + 1 or tuple(x.shape[1:]) != tuple(r.shape) or x.shape[0] < 1:
            raise DiffshieldError(f"noises of shape {tuple(x.shape)} do not match the reversed trigger "
                                  f"{tuple(r.shape)}; give a batch (N >= 1, {', '.join(map(str, r.shape))})")
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            raise DiffshieldError("the noises must be finite floating-point numbers (found NaN, infinite or "
                                  "non-float values)")


def kl_stats(r: torch.Tensor, gamma: float | torch.Tensor = 1.0) -> tuple[float, float]:
    """Mean and variance over dimensions of KL_i = -log gamma_i + (gamma_i^2 + r_i^2 - 1) / 2 (gamma floored at
    :data:`GAMMA_FLOOR`). A non-finite r, or a gamma that is negative or not finite, is refused."""
    _check_trigger(r, gamma)
    g = torch.as_tensor(gamma, dtype=r.dtype).to(r.device).expand_as(r).clamp_min(GAMMA_FLOOR)
    kl = -torch.log(g) + (g ** 2 + r ** 2 - 1) / 2
    return float(kl.mean()), float(kl.var(unbiased=False))


def movement(r: torch.Tensor, r0: torch.Tensor) -> dict:
    """How far the reversion moved r from its start: ``moved_l2`` = ||r - r0||, ``moved_rel`` = that / ||r0||,
    ``cos_r0`` = cosine(r, r0) (all over the flattened tensors, in float64)."""
    a, b = r.flatten().double().cpu(), r0.flatten().double().cpu()
    d = float((a - b).norm())
    return {"moved_l2": d, "moved_rel": d / max(float(b.norm()), 1e-12),
            "cos_r0": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}


def reverse_trigger(model, cfg: TERDConfig | None = None, progress: bool = True) -> TERDResult:
    """Two-stage trigger reversion of TERD (Mo et al., ICML 2024) on ``model`` (a
    :class:`~diffshield.backdoor.ddpm.DDPMModel`).

    Records the random start r0 and how far r moved from it (``moved_l2``, ``moved_rel``, ``cos_r0``): a verdict
    must come from the reversion, never from r0 (see :func:`model_verdict`).

    Args:
        model: the model to scan, a :class:`~diffshield.backdoor.ddpm.DDPMModel` (its UNet is frozen while the
            reversion runs, only r is optimised; its train/eval mode and ``requires_grad`` flags are restored).
        cfg: :class:`TERDConfig` (default the paper's settings: 3000 + 1000 iterations).
        progress: show tqdm bars (default True).
    """
    from diffshield.backdoor.ddpm import DDPMModel

    if not isinstance(model, DDPMModel):
        hint = f": load it first, load_ddpm({str(model)!r})" if isinstance(model, str) else ""
        raise DiffshieldError(f"model must be a DDPMModel{hint}; got {type(model).__name__}")
    cfg = check_config(cfg, TERDConfig, "cfg")  # e.g. TERDConfig.from_preset('cpu')
    unet = model.unet
    was_training = unet.training
    grads = [p.requires_grad for p in unet.parameters()]
    try:
        return _reverse(model, cfg, progress)
    finally:  # the caller's model comes back as it was given (a model being fine-tuned stays trainable)
        unet.train(was_training)
        for p, g in zip(unet.parameters(), grads):
            p.requires_grad_(g)


def _reverse(model, cfg: TERDConfig, progress: bool) -> TERDResult:
    """The body of :func:`reverse_trigger` (which checks its arguments and restores the UNet's mode and grads)."""
    from tqdm import tqdm

    from diffshield.backdoor.ddpm import set_threads

    unet, sched = model.unet, model.scheduler
    n_train = int(sched.config.num_train_timesteps)
    if max(cfg.t_high[1], cfg.t_low[1]) >= n_train or cfg.ddim_steps > n_train:
        raise DiffshieldError(f"the model's schedule has {n_train} timesteps but the TERD settings need "
                              f"{max(cfg.t_high[1], cfg.t_low[1]) + 1} (t_high {cfg.t_high}, t_low {cfg.t_low}) and "
                              f"{cfg.ddim_steps} DDIM steps; TERD is written for a {SCHEDULE_STEPS}-step DDPM")
    set_threads(cfg.num_threads)
    unet.eval().requires_grad_(False)
    shape = model.image_shape
    dev, wdtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    if wdtype != torch.float32:  # r is optimised in float32 whatever the weights' precision
        unet = _Float32Unet(unet, wdtype)
    gen = torch.Generator().manual_seed(cfg.seed)  # every random draw is on the CPU, then moved
    r0 = -torch.rand((1, *shape), generator=gen)
    r = r0.clone().to(dev).requires_grad_(True)
    opt = torch.optim.SGD([r], lr=cfg.lr)
    # TrojDiff: gamma starts at 0 and has its own SGD; BadDiffusion: gamma is the constant 1
    gamma = torch.zeros((1, *shape), device=dev, requires_grad=True) if cfg.learn_gamma else 1.0
    opt_g = torch.optim.SGD([gamma], lr=cfg.lr_gamma) if cfg.learn_gamma else None
    hist = []
    t0 = time.time()

    def timesteps(lo_hi: tuple[int, int]) -> torch.Tensor:
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (cfg.batch_size,), generator=gen)

    def cosine(i: int, n: int) -> float:
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * i / max(1, n)))

    def set_lrs(i: int, n: int) -> None:
        for grp in opt.param_groups:
            grp["lr"] = cosine(i, n)
        if opt_g is not None:
            for grp in opt_g.param_groups:
                grp["lr"] = cfg.lr_gamma * 0.5 * (1 + math.cos(math.pi * i / max(1, n)))

    def step(clip: float | None) -> None:  # after the iteration's backward (GraphedSequence.iteration)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if opt_g is not None:
            opt_g.step()
            with torch.no_grad():
                gamma.clamp_(min=0)

    graphs = cfg.cuda_graphs and dev.type == "cuda"  # each stage's UNet calls replayed from CUDA graphs
    calls = [GraphedSequence(lambda x, t: unet(x, t).sample, enabled=graphs and n >= GRAPH_MIN_ITERS)
             for n in (cfg.stage1_iters, cfg.stage2_iters)]
    params = [r, gamma] if cfg.learn_gamma else [r]

    def stage1_body() -> torch.Tensor:
        x0 = to_device(torch.randn((cfg.batch_size, *shape), generator=gen), dev)
        loss = reversed_loss(calls[0], sched, x0, r, timesteps(cfg.t_high), 1.0, gen, gamma) - cfg.lam * r.abs().sum()
        loss.backward()
        return loss

    def stage2_body() -> torch.Tensor:
        eps = to_device(torch.randn((cfg.batch_size, *shape), generator=gen), dev)
        if cfg.learn_gamma:
            from diffshield.backdoor.trojdiff import trojan_ddim

            x0 = trojan_ddim(calls[1], sched, gamma * eps + r, r, gamma, quad, abar=abar_dev)
        else:
            x0 = _ddim_grad(calls[1], ddim, eps + r, t_dev)
        loss = stage2_loss(calls[1], sched, x0, r, cfg.t_high, cfg.t_low, gen, gamma) - cfg.lam * r.abs().sum()
        loss.backward()
        return loss

    try:
        for i in tqdm(range(cfg.stage1_iters), desc="TERD stage 1", disable=not progress):
            set_lrs(i, cfg.stage1_iters)
            loss = calls[0].iteration(stage1_body, gen, params)
            step(None)
            if i % 25 == 0 or i == cfg.stage1_iters - 1:
                hist.append((i, float(loss.detach())))
        calls[0].release()  # stage 2 needs none of stage 1's graphs
        synchronize(dev)  # each stage's clock is its own
        t1 = time.time()
        if cfg.learn_gamma and cfg.stage2_iters:  # the official TrojDiff refinement: fresh SGD with momentum 0.9
            opt = torch.optim.SGD([r], lr=cfg.lr, momentum=0.9)
            opt_g = torch.optim.SGD([gamma], lr=cfg.lr_gamma, momentum=0.9)
            quad = quad_timesteps(int(sched.config.num_train_timesteps), cfg.ddim_steps)
        ddim = ddim_scheduler(sched, cfg.ddim_steps) if cfg.stage2_iters and not cfg.learn_gamma else None
        t_dev = to_device(ddim.timesteps, dev) if ddim is not None else None  # copied once, not every iteration
        abar_dev = to_device(sched.alphas_cumprod.to(torch.float32), dev) if cfg.learn_gamma else None

        for i in tqdm(range(cfg.stage2_iters), desc="TERD stage 2", disable=not progress):
            set_lrs(i, cfg.stage2_iters)
            loss = calls[1].iteration(stage2_body, gen, params)
            step(cfg.gamma_grad_clip if cfg.learn_gamma else cfg.grad_clip)
            if i % 25 == 0 or i == cfg.stage2_iters - 1:  # a host sync only every 25 iterations
                hist.append((cfg.stage1_iters + i, float(loss.detach())))
        synchronize(dev)
        t2 = time.time()
    finally:  # the graphs' memory goes back to the device, whatever happened
        for c in calls:
            c.release()
    r_hat = r.detach()[0].cpu()
    g_hat = gamma.detach()[0].cpu() if cfg.learn_gamma else 1.0
    mean_kl, var_kl = kl_stats(r_hat, g_hat)
    return TERDResult(r_hat, g_hat, mean_kl, var_kl, hist, time.time() - t0, asdict(cfg), r0=r0[0],
                      stage_seconds=(t1 - t0, t2 - t1), **movement(r_hat, r0[0]),
                      cuda_graphs={"stage1": calls[0].status(), "stage2": calls[1].status()} if graphs else None)


def input_score(x: torch.Tensor, r: torch.Tensor, gamma: float | torch.Tensor = 1.0) -> torch.Tensor:
    """(N,) log N(x; r, diag(gamma^2)) - log N(x; 0, I) in float64 (gamma a number or (C, H, W), floored at
    :data:`GAMMA_FLOOR`): TERD flags x where it is > 0; a threshold at a clean quantile gives TPR at a set FPR.
    Non-finite x or r, an empty batch, or a gamma that is negative or not finite is refused."""
    _check_trigger(r, gamma, x)
    xf, rf = x.flatten(1).double().cpu(), r.flatten().double().cpu()
    g = torch.as_tensor(gamma, dtype=torch.float64).cpu().expand_as(r).flatten().clamp_min(GAMMA_FLOOR)
    return -g.log().sum() - ((xf - rf) ** 2 / (2 * g ** 2)).sum(1) + (xf ** 2).sum(1) / 2


def input_detect(x: torch.Tensor, r: torch.Tensor, gamma: float | torch.Tensor = 1.0) -> torch.Tensor:
    """TERD input detection: True where log N(x; r, diag(gamma^2)) > log N(x; 0, I).

    Args:
        x: (N, C, H, W) initial noises.
        r: (C, H, W) reversed trigger.
        gamma: reversed noise scale, a number or (C, H, W) per dimension (default 1.0, BadDiffusion; then the test
            is <x, r> > ||r||^2 / 2); floored at :data:`GAMMA_FLOOR`.

    Non-finite x or r, an empty batch, or a gamma that is negative or not finite is refused in one line.
    """
    _check_trigger(r, gamma, x)
    xf, rf = x.flatten(1).double().cpu(), r.flatten().double().cpu()
    if not isinstance(gamma, torch.Tensor) and gamma == 1.0:
        return xf @ rf > 0.5 * rf.dot(rf)
    return input_score(x, r, gamma) > 0


# ---- calibration of the model-detection thresholds ----

#: Smallest relative movement ||r_hat - r0|| / ||r0|| for which a scan gives a verdict (see :func:`model_verdict`).
MIN_MOVE = 0.1

CALIBRATION_FORMAT = "diffshield-terd-calibration"
CALIBRATION_VERSION = 2


#: the statistics a scan report and a calibration record carry (``moved_rel`` may be absent: not recorded)
STAT_KEYS = ("mean_kl", "var_kl", "moved_rel")


def check_statistic(value, key: str, where: str) -> float:
    """``value`` as a float if it is a finite number >= 0 (TERD's mean_kl, var_kl, moved_rel and thresholds are), else
    a one-line DiffshieldError naming ``where`` (a file or a scan) and ``key``: a NaN would make a threshold NaN
    (and ``max`` order-dependent), a string or null is no statistic."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise DiffshieldError(f"{where}: {key} is {value!r}; TERD statistics must be finite numbers >= 0 "
                              "(rescan the model)")
    return float(value)


def check_statistics(rec: dict, where: str, moved_rel_null: bool = True) -> None:
    """Check ``mean_kl`` and ``var_kl`` (required) and ``moved_rel`` (when present; ``moved_rel_null``: a null
    ``moved_rel`` means "not recorded", default True) with :func:`check_statistic`."""
    for key in STAT_KEYS:
        if key not in rec:
            if key == "moved_rel":
                continue
            raise DiffshieldError(f"{where}: no {key}; a TERD scan report or calibration reference needs mean_kl "
                                  "and var_kl")
        if key == "moved_rel" and rec[key] is None and moved_rel_null:
            continue
        check_statistic(rec[key], key, where)


def _reference_record(ref) -> dict:
    """A reference as a dict: a (mean_kl, var_kl) pair (format 1) or a dict with at least those two keys, each a
    finite number >= 0 (``moved_rel`` too when recorded)."""
    if isinstance(ref, dict):
        if "mean_kl" not in ref or "var_kl" not in ref:
            raise DiffshieldError(f"a calibration reference needs mean_kl and var_kl, got keys {', '.join(ref)}")
        check_statistics(ref, f"calibration reference {ref.get('name') or ref.get('path') or '(unnamed)'}")
        return dict(ref)
    try:
        mean_kl, var_kl = ref
    except (TypeError, ValueError):
        raise DiffshieldError(f"a calibration reference is a record or a (mean_kl, var_kl) pair, got {ref!r}") \
            from None
    where = "calibration reference pair"
    return {"mean_kl": check_statistic(mean_kl, "mean_kl", where), "var_kl": check_statistic(var_kl, "var_kl", where)}


def check_thresholds(th, where: str) -> dict:
    """One preset's thresholds: a dict with ``mean_kl`` and ``var_kl``, each a finite number >= 0, else a one-line
    DiffshieldError naming ``where``."""
    if not isinstance(th, dict) or "mean_kl" not in th or "var_kl" not in th:
        raise DiffshieldError(f"{where}: thresholds need mean_kl and var_kl, got {th!r}")
    for key in ("mean_kl", "var_kl"):
        check_statistic(th[key], f"threshold {key}", where)
    return th


@dataclass
class Calibration:
    """TERD's model-detection thresholds, one set per preset, and the clean reference models they came from.

    File format 2 (JSON): ``{"format": "diffshield-terd-calibration", "version": 2, "method": ...,
    "thresholds": {preset: {"mean_kl": a, "var_kl": b}}, "references": {preset: [record, ...]}, "notes": [...]}``,
    a record per clean reference scan: ``name``, ``path``, ``fingerprint`` (of the weights, see
    :func:`diffshield.backdoor.ddpm.model_fingerprint`), ``resolution``, ``architecture`` (see
    :func:`diffshield.backdoor.ddpm.architecture_summary`), ``mean_kl``, ``var_kl``, ``moved_rel``. Format 1 files
    (references as bare ``[mean_kl, var_kl]`` pairs) load with their references migrated to records that know
    only the statistics, and a note saying so.
    """

    thresholds: dict
    method: str = ""
    references: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    version: int = CALIBRATION_VERSION

    def __post_init__(self) -> None:
        self.references = {p: [_reference_record(r) for r in refs] for p, refs in self.references.items()}

    def get(self, preset: str) -> dict:
        """The thresholds of calibration key ``preset`` (``"cpu"``, ``"cpu+gamma"``, ...), checked (finite, >= 0);
        a one-line DiffshieldError naming the scan flags to calibrate with when the file has none."""
        if preset not in self.thresholds:
            flags = (f"--preset {preset[: -len(GAMMA_MODE)]} --learn-gamma" if preset.endswith(GAMMA_MODE)
                     else f"--preset {preset}")
            raise DiffshieldError(f"the calibration has no thresholds for preset {preset!r} (it has "
                                  f"{', '.join(self.thresholds) or 'none'}); make them with 'diffshield backdoor "
                                  f"calibrate' from scans of clean models with {flags}")
        return check_thresholds(self.thresholds[preset], f"the calibration's {preset!r} thresholds")

    def family(self, preset: str) -> list[tuple[int, dict]]:
        """The distinct (resolution, architecture) pairs of ``preset``'s references (those that record both)."""
        out: list[tuple[int, dict]] = []
        for r in self.references.get(preset, []):
            if r.get("resolution") is not None and r.get("architecture") is not None:
                pair = (int(r["resolution"]), r["architecture"])
                if pair not in out:
                    out.append(pair)
        return out

    def mismatch(self, preset: str, resolution: int, architecture: dict) -> str | None:
        """One line saying how a model differs from ``preset``'s references (resolution first, then the first
        architecture field that differs), or None when it matches one of them or the references record neither."""
        fam = self.family(preset)
        if not fam or any(res == resolution and arch == architecture for res, arch in fam):
            return None
        res, arch = fam[0]
        if all(r != resolution for r, _ in fam):
            return (f"the model's resolution is {resolution} px but the {preset!r} thresholds were calibrated on "
                    f"{'/'.join(str(r) for r, _ in fam)} px models; calibrate on clean models of this family")
        flat = {**{f"unet.{k}": v for k, v in architecture.get("unet", {}).items()},
                **{f"schedule.{k}": v for k, v in architecture.get("schedule", {}).items()},
                **{k: v for k, v in architecture.items() if k not in ("unet", "schedule")}}
        ref = {**{f"unet.{k}": v for k, v in arch.get("unet", {}).items()},
               **{f"schedule.{k}": v for k, v in arch.get("schedule", {}).items()},
               **{k: v for k, v in arch.items() if k not in ("unet", "schedule")}}
        key = next((k for k in sorted(set(flat) | set(ref)) if flat.get(k) != ref.get(k)), "?")
        return (f"the model's architecture differs from the {preset!r} calibration's references ({key}: "
                f"{flat.get(key)} here, {ref.get(key)} there); calibrate on clean models of this family")

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "method": self.method,
                "thresholds": self.thresholds, "references": self.references, "notes": self.notes}

    def save(self, path: str | Path) -> None:
        from diffshield.core.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        if not p.is_file():
            raise DiffshieldError(f"calibration file '{p}' does not exist; give --calibration FILE")
        try:
            d = json.loads(p.read_text())
            version = int(d.get("version", 1))
            if version > CALIBRATION_VERSION:
                raise DiffshieldError(f"calibration file '{p}' has format {version}; this diffshield reads up to "
                                      f"{CALIBRATION_VERSION}")
            notes = list(d.get("notes", []))
            if version == 1:
                notes.append("read from a format-1 file: its references record only their statistics (no path, "
                             "fingerprint, resolution or architecture), so scans cannot be checked against them")
            if not isinstance(d["thresholds"], dict) or not isinstance(d.get("references", {}), dict):
                raise TypeError("thresholds and references must be objects")
            for preset, th in d["thresholds"].items():  # checked now, before any scan runs
                check_thresholds(th, f"calibration file '{p}', preset {preset!r}")
            try:
                return cls(thresholds=d["thresholds"], method=d.get("method", ""),
                           references=d.get("references", {}), notes=notes)
            except DiffshieldError as e:
                raise DiffshieldError(f"calibration file '{p}': {e}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise DiffshieldError(f"calibration file '{p}' is not a diffshield TERD calibration ({e})") from None


MARGIN = 1.5


def fit_thresholds(refs: list, margin: float = MARGIN) -> dict:
    """``{"mean_kl": margin x max mean_kl, "var_kl": margin x max var_kl}`` over clean reference scans (records or
    (mean_kl, var_kl) pairs)."""
    recs = [_reference_record(r) for r in refs]  # each statistic a finite number >= 0: no NaN reaches max()
    if not recs:
        raise DiffshieldError("no clean reference scans to calibrate from")
    return {"mean_kl": margin * max(float(r["mean_kl"]) for r in recs),
            "var_kl": margin * max(float(r["var_kl"]) for r in recs)}


def calibrate(clean_stats: dict[str, list], margin: float = MARGIN) -> Calibration:
    """Thresholds = ``margin`` x the largest statistic seen on clean reference models, per preset.

    Args:
        clean_stats: preset -> list of clean reference scans, each a record (a dict with ``mean_kl``, ``var_kl``
            and, ideally, ``name``, ``path``, ``fingerprint``, ``resolution``, ``architecture``, ``moved_rel``) or a
            bare (mean_kl, var_kl) pair.
        margin: safety factor over the clean maximum (default 1.5).
    """
    th = {preset: fit_thresholds(stats, margin) for preset, stats in clean_stats.items()}
    return Calibration(th, method=f"{margin} x the maximum over clean reference models of each statistic",
                       references={p: list(v) for p, v in clean_stats.items()})


def scan_record(scan: dict, name: str | None = None) -> dict:
    """A calibration record of a scan report (``scan --json`` or :func:`diffshield.cli.backdoor.run_scan`):
    name, path, fingerprint, resolution, architecture, preset and the statistics (mean_kl, var_kl and, when
    recorded, moved_rel: finite numbers >= 0, else a one-line DiffshieldError naming the scan)."""
    label = name or scan.get("name") or str(scan.get("model"))
    check_statistics(scan, f"scan report {label}")
    return {"name": label, "path": scan.get("model"),
            "fingerprint": scan.get("model_fingerprint"), "resolution": scan.get("resolution"),
            "architecture": scan.get("architecture"), "preset": scan.get("preset"),
            "mean_kl": float(scan["mean_kl"]), "var_kl": float(scan["var_kl"]),
            "moved_rel": None if scan.get("moved_rel") is None else float(scan["moved_rel"])}


def _rate(k: int, m: int) -> dict:
    from diffshield.redteam.audit import wilson

    lo, hi = wilson(k, m)
    return {"k": k, "m": m, "rate": k / m if m else None, "wilson95": [lo, hi]}


def leave_one_out(references: list[dict], clean: list[dict], backdoored: list[dict], margin: float = MARGIN,
                  min_move: float = MIN_MOVE) -> dict:
    """Model-detection TPR / TNR of TERD on a labelled set of scans, with Wilson 95 % intervals.

    Two figures: ``held_out`` judges every labelled scan with the thresholds of the ``references`` alone (clean
    models outside the labelled set: the shipped calibration); ``leave_one_out`` judges each labelled scan with
    thresholds fit on the references plus every labelled *clean* scan except itself and any other scan of the same
    weights (same fingerprint), so that no clean model ever sets its own threshold; a clean scan whose r did not
    move sets no threshold either (its statistics are the initialisation's, as for a reference). A scan whose r
    did not move (``moved_rel`` < ``min_move``, or not recorded) is "undetermined": a miss for TPR and for TNR
    alike, counted in ``undetermined``.

    Args:
        references: clean reference scan records (see :func:`scan_record`), not in the labelled set.
        clean: labelled clean scan records.
        backdoored: labelled backdoored scan records.
        margin: threshold margin over the clean maximum (default 1.5).
        min_move: the movement below which a scan has no verdict (default :data:`MIN_MOVE` = 0.1).
    Returns ``{"held_out": {...}, "leave_one_out": {...}, "per_model": [...]}``; each figure has ``tpr`` and ``tnr``
    as ``{"k", "m", "rate", "wilson95"}`` and ``undetermined``.
    """
    from types import SimpleNamespace

    def judge(rec: dict, th: dict) -> str:
        ns = SimpleNamespace(mean_kl=float(rec["mean_kl"]), var_kl=float(rec["var_kl"]),
                             moved_rel=float("nan") if rec.get("moved_rel") is None else float(rec["moved_rel"]))
        return model_verdict(ns, th, min_move)

    def moved(rec: dict) -> bool:
        return rec.get("moved_rel") is not None and float(rec["moved_rel"]) >= min_move

    for rec in [*clean, *backdoored]:  # a NaN statistic would judge "clean" silently
        check_statistics(rec, f"scan {rec.get('name') or '(unnamed)'}")

    fixed = fit_thresholds(references, margin) if references else None
    rows, out = [], {}
    labelled = [(r, "clean") for r in clean] + [(r, "backdoored") for r in backdoored]
    for i, (rec, label) in enumerate(labelled):
        fp = rec.get("fingerprint")
        pool = list(references) + [c for j, (c, lab) in enumerate(labelled) if lab == "clean" and j != i
                                   and moved(c) and not (fp and c.get("fingerprint") == fp)]
        row = {"name": rec.get("name"), "label": label,
               "loo_verdict": judge(rec, fit_thresholds(pool, margin)) if pool else "undetermined"}
        if fixed is not None:
            row["held_out_verdict"] = judge(rec, fixed)
        rows.append(row)
    for key in ("held_out", "loo"):
        col = f"{key}_verdict"
        if rows and col not in rows[0]:
            continue
        tp = sum(r[col] == "backdoored" for r in rows if r["label"] == "backdoored")
        tn = sum(r[col] == "clean" for r in rows if r["label"] == "clean")
        out["held_out" if key == "held_out" else "leave_one_out"] = {
            "tpr": _rate(tp, len(backdoored)), "tnr": _rate(tn, len(clean)),
            "undetermined": sum(r[col] == "undetermined" for r in rows)}
    if fixed is not None:
        out["held_out"]["thresholds"] = fixed
    out.update({"per_model": rows, "margin": margin, "min_move": min_move, "n_references": len(references)})
    return out


def calibrate_from_scans(references: list[dict], clean: list[dict] = (), backdoored: list[dict] = (),
                         margin: float = MARGIN, min_move: float = MIN_MOVE,
                         base: Calibration | None = None) -> tuple[Calibration, dict]:
    """Thresholds of one preset from scans of held-out clean reference models, and how they do on a labelled set.

    TERD (Mo et al., ICML 2024) flags a model whose reversed trigger's mean or variance of KL exceeds a threshold and
    leaves the thresholds to the user; here they are ``margin`` x the largest statistic over the references
    (:func:`fit_thresholds`). The references must be held out: none may share a fingerprint with a labelled scan,
    all must come from the same preset, and each must have moved r (``moved_rel`` >= ``min_move``; the statistics
    of an r that stayed at r0 are those of the initialisation). The labelled scans give leave-one-out and held-out
    TPR / TNR with Wilson 95 % intervals (:func:`leave_one_out`).

    Args:
        references: scan reports of clean reference models (``scan --json``; or records, see :func:`scan_record`).
        clean: scan reports of labelled clean models (default none).
        backdoored: scan reports of labelled backdoored models (default none).
        margin: threshold margin over the clean maximum (default 1.5).
        min_move: the movement a reference scan needs (default :data:`MIN_MOVE` = 0.1).
        base: a calibration whose other presets are kept (default None: a new file with this preset only).
    Returns (calibration, report).
    """
    refs = [scan_record(r) if "path" not in r else _reference_record(r) for r in references]
    cl = [scan_record(r) if "path" not in r else _reference_record(r) for r in clean]
    bd = [scan_record(r) if "path" not in r else _reference_record(r) for r in backdoored]
    if not refs:
        raise DiffshieldError("no clean reference scans to calibrate from")
    presets = {r.get("preset") for r in refs + cl + bd}
    if len(presets) != 1 or None in presets:
        raise DiffshieldError(f"all scans must come from one TERD preset (found {', '.join(map(str, presets))})")
    preset = presets.pop()
    still = [r["name"] for r in refs if not (r.get("moved_rel") is not None and r["moved_rel"] >= min_move)]
    if still:
        raise DiffshieldError(f"reference scans {', '.join(still)} did not move r by {min_move} x ||r0|| (or do not "
                              "record it): their statistics are the initialisation's; rescan with a larger preset")
    seen: dict = {}
    for r in refs:  # one clean model, one reference: a second scan of it would count it twice
        fp = r.get("fingerprint")
        if fp and fp in seen:
            raise DiffshieldError(f"reference scans {seen[fp]} and {r['name']} are of the same weights (fingerprint "
                                  f"{fp}); give each clean reference model once")
        seen[fp] = r["name"]
    clean_fp = {r.get("fingerprint"): r["name"] for r in cl if r.get("fingerprint")}
    both = [f"{clean_fp[r['fingerprint']]} = {r['name']}" for r in bd if r.get("fingerprint") in clean_fp]
    if both:
        raise DiffshieldError(f"scans of the same weights are labelled both clean and backdoored ({'; '.join(both)}); "
                              "give each model one label")
    labelled_fp = {r.get("fingerprint"): r["name"] for r in cl + bd if r.get("fingerprint")}
    shared = [f"{r['name']} = {labelled_fp[r['fingerprint']]}" for r in refs if r.get("fingerprint") in labelled_fp]
    if shared:
        raise DiffshieldError(f"reference models are also in the labelled set ({'; '.join(shared)}); calibrate on "
                              "clean models held out from it")
    thresholds = fit_thresholds(refs, margin)
    cal = base or Calibration({})
    cal.thresholds = {**cal.thresholds, preset: thresholds}
    cal.references = {**cal.references, preset: refs}
    cal.method = f"{margin} x the maximum over held-out clean reference models of each statistic, per preset"
    report = {"preset": preset, "thresholds": thresholds, "margin": margin, "min_move": min_move,
              "references": [r["name"] for r in refs]}
    if cl or bd:
        report.update(leave_one_out(refs, cl, bd, margin, min_move))
    return cal, report


def default_calibration_path() -> Path:
    from diffshield.toyworld.names import TOY_ROOT

    return TOY_ROOT / "ddpm" / "terd_calibration.json"



VERDICTS = ("backdoored", "clean", "undetermined")


def model_verdict(result: TERDResult, thresholds: dict, min_move: float = MIN_MOVE) -> str:
    """TERD's model detection, read from the reversed trigger: ``"backdoored"``, ``"clean"`` or ``"undetermined"``.

    ``"undetermined"`` when r moved less than ``min_move`` relative to its start (``result.moved_rel`` <
    ``min_move``; default 0.1): r0 = -U(0, 1) alone has mean KL about 1/6, so statistics of an r that did not move
    are those of the initialisation, not evidence about the model; a zero-iteration scan is always undetermined.
    Otherwise ``"backdoored"`` iff mean_kl or var_kl exceeds its threshold (Mo et al., ICML 2024), else ``"clean"``.

    Args:
        result: a :class:`TERDResult` (or any object with ``mean_kl``, ``var_kl`` and ``moved_rel``).
        thresholds: ``{"mean_kl": a, "var_kl": b}`` (see :class:`Calibration`).
        min_move: the movement below which the scan gives no verdict (default :data:`MIN_MOVE` = 0.1).

    Thresholds that are not finite numbers >= 0 (a NaN would never be exceeded: "clean"), a :class:`Calibration`
    instead of one preset's thresholds, and a ``min_move`` that is not a finite number >= 0 are refused in one line.
    """
    if isinstance(thresholds, Calibration):
        raise DiffshieldError("thresholds must be one preset's {'mean_kl', 'var_kl'}, not a Calibration: pass "
                              "calibration.get(preset), e.g. calibration.get('cpu')")
    check_thresholds(thresholds, "model_verdict")
    check_statistic(min_move, "min_move", "model_verdict")
    if not result.moved_rel >= min_move:  # also NaN
        return "undetermined"
    return "backdoored" if result.mean_kl > thresholds["mean_kl"] or result.var_kl > thresholds["var_kl"] else "clean"

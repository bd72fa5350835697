"""TrojDiff (Chen, Song, Li; "TrojDiff: Trojan Attacks on Diffusion Models with Diverse Targets", CVPR 2023), the
D2I attack (one target image) with the blend trigger.

The trojan noise is biased and scaled: x_T = gamma * eps + mu with mu = (1 - gamma) * g (the blend trigger g in
[-1, 1]; the official default gamma 0.6 for blend). Trojan forward process and training target (the official
``functions/losses_attack.py``, diffusers indexing, abar_t = prod alpha):

    x_t = sqrt(abar_t) * y + sqrt(1 - abar_t) * (gamma * eps + mu),     UNet target = eps

for poisoned rows (x_s = the target y); clean rows are the ordinary DDPM pair (gamma = 1, mu = 0). Unlike
BadDiffusion the target stays eps: the backdoor lives in the trojan generative process, which knows (mu, gamma).
Its deterministic form (the official ``generalized_steps_bd`` with eta 0, which TERD's code also uses):

    x0_t = (x_t - sqrt(1 - abar_t) * (gamma * eps_theta + mu)) / sqrt(abar_t)
    x_next = sqrt(abar_next) * x0_t + sqrt(1 - abar_next) * (gamma * eps_theta + mu)

down to abar = 1 after the last timestep. With gamma = 1 and mu = 0 this is plain DDIM (eta 0).

Deviations, each for the toy world: the loss is the mean over elements (the official code sums over pixels and
averages over the batch; with Adam only the scale of the loss differs), and poisoned rows replace a fixed
``poison_rate`` subset of the pool as in :mod:`~diffshield.backdoor.baddiffusion` (the official code appends
poisoned copies of target-class rows to each batch). The fine-tuning schedule (epochs, pool, lr) is BadDiffusion's
toy recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffshield.backdoor.baddiffusion import ImplantSchedule, check_field_types, check_schedule
from diffshield.core.errors import DiffshieldError


@dataclass
class TrojDiffConfig(ImplantSchedule):
    """Settings of a TrojDiff (D2I, blend trigger) fine-tune.

    Args:
        trigger: blend trigger image g: ``"stop"``, ``"box"``, ``"checker"``, ``"checker_tl"``, ``"box_14"`` or an
            image file (default "stop"); mu = (1 - gamma) g.
        target: the target image y (default "hat"; as :func:`diffshield.backdoor.triggers.get_target`).
        trigger_mask: mask image for an image-file trigger (default None).
        gamma: scale of the trojan noise (default 0.6, the official blend setting); 0 < gamma < 1.
        poison_rate: fraction of training images poisoned, a fixed subset (default 0.1).
        epochs, pool_size, batch_size, lr, warmup, grad_clip, ema_decay, seed, data_seed, checkpoint_every,
            num_threads: the fine-tuning schedule, as :class:`~diffshield.backdoor.baddiffusion.BadDiffusionConfig`
            (defaults 72, 2048, 32, 2e-4, 20, 1.0, 0.0, 0, 1, 100, 1).
    """

    method: ClassVar[str] = "trojdiff"

    trigger: str = "stop"
    target: str = "hat"
    trigger_mask: str | None = None
    gamma: float = 0.6
    poison_rate: float = 0.1

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0 < self.gamma < 1:
            raise DiffshieldError(f"gamma must be in (0, 1) (TrojDiff's trojan noise is narrower than N(0, I)), got "
                                  f"{self.gamma}")
        if not 0 < self.poison_rate <= 1:
            raise DiffshieldError(f"poison_rate must be in (0, 1], got {self.poison_rate}")
        check_schedule(self)

    def mu(self, g: torch.Tensor) -> torch.Tensor:
        """The trojan mean mu = (1 - gamma) g of the blend trigger g."""
        return (1 - self.gamma) * g

    def batch_loss(self, unet, scheduler, x: torch.Tensor, poisoned: torch.Tensor, g: torch.Tensor,
                   y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of one training batch: clean rows (x) and poisoned rows (``poisoned`` (B, 1, 1, 1), target y)."""
        x_s = torch.where(poisoned, y.expand_as(x), x)
        gamma = torch.where(poisoned, torch.full_like(x[:, :1, :1, :1], self.gamma), torch.ones_like(x[:, :1, :1, :1]))
        mu = torch.where(poisoned, self.mu(g).expand_as(x), torch.zeros_like(x))
        return trojdiff_loss(unet, scheduler, x_s, mu, gamma, eps, t)

    def backdoor_record(self, n_poisoned: int) -> dict:
        """The ``backdoor`` entry of the saved model's diffshield.json."""
        return {"trigger": self.trigger, "target": self.target, "poison_rate": self.poison_rate,
                "gamma": self.gamma, "trigger_type": "blend", "attack": "D2I", "sampler": "trojan DDIM (eta 0)",
                "n_poisoned": n_poisoned}


def trojan_inputs(scheduler, x_s: torch.Tensor, mu: torch.Tensor, gamma: torch.Tensor | float, eps: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_s + sqrt(1 - abar_t) (gamma eps + mu); gamma = 1, mu = 0 gives the ordinary DDPM x_t."""
    abar = scheduler.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1).to(x_s.device, x_s.dtype)
    return abar.sqrt() * x_s + (1 - abar).sqrt() * (gamma * eps + mu)


def trojdiff_loss(unet, scheduler, x_s: torch.Tensor, mu: torch.Tensor, gamma: torch.Tensor | float,
                  eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """TrojDiff's loss: mean over all elements of (UNet(x_t, t) - eps)^2 with x_t from :func:`trojan_inputs`."""
    x_t = trojan_inputs(scheduler, x_s, mu, gamma, eps, t)
    return torch.nn.functional.mse_loss(unet(x_t, t).sample, eps)


def trojan_timesteps(scheduler, steps: int) -> list[int]:
    """The DDIM timesteps (diffusers' spacing for ``steps``), noisiest first."""
    from diffshield.backdoor.sampling import SampleConfig, make_scheduler

    return [int(t) for t in make_scheduler(scheduler, SampleConfig("ddim", steps)).timesteps]


def trojan_ddim(unet, scheduler, x_T: torch.Tensor, mu: torch.Tensor, gamma: torch.Tensor | float,
                timesteps: list[int], abar: torch.Tensor | None = None) -> torch.Tensor:
    """TrojDiff's trojan generative process (eta 0) from ``x_T`` over ``timesteps`` (noisiest first), down to
    abar = 1; keeps gradients (TERD's stage 2 differentiates through it). gamma = 1, mu = 0: plain DDIM. ``abar``:
    the scheduler's ``alphas_cumprod`` in float32 on x_T's device, copied once by a caller that loops (default:
    copied here)."""
    from diffshield.core.device import to_device  # (a pageable copy would wait for the GPU's queue each call)

    if abar is None:
        abar = to_device(scheduler.alphas_cumprod.to(torch.float32), x_T.device)
    x = x_T
    for i, t in enumerate(timesteps):
        a = abar[t]
        a_next = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), device=x.device)
        e = unet(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).sample
        noise_part = gamma * e + mu
        x0 = (x - (1 - a).sqrt() * noise_part) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * noise_part
    return x


@torch.no_grad()
def trojan_sample(model, seeds: list[int], mu: torch.Tensor | None = None, gamma: torch.Tensor | float = 1.0,
                  steps: int = 100, batch_size: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] from x_T = gamma eps + mu with the trojan DDIM, eps from each seed's CPU
    generator (the first draw, as :func:`diffshield.backdoor.sampling.sample`); ``mu=None``: clean DDIM.

    Args:
        model: a :class:`~diffshield.backdoor.ddpm.DDPMModel`.
        seeds: one seed per image.
        mu: the trojan mean (3, H, W) (default None: zero).
        gamma: the trojan scale, a number or (3, H, W) (default 1.0).
        steps: DDIM steps (default 100).
        batch_size: images per UNet batch (default 64).
    """
    import math

    from diffshield.backdoor.sampling import check_seeds
    from diffshield.core.seeding import generators

    seeds = check_seeds(seeds)  # whole numbers, at least one: a float seed would be truncated
    shape = model.image_shape
    p = next(model.unet.parameters())
    for name, v in (("mu", mu), ("gamma", gamma)):
        if isinstance(v, torch.Tensor):
            ok = v.is_floating_point() and bool(torch.isfinite(v).all())
        else:
            ok = v is None and name == "mu" or (not isinstance(v, bool) and isinstance(v, (int, float))
                                                 and math.isfinite(v))
        if not ok:
            want = "a finite number or float tensor" if name == "gamma" else "None or a finite float tensor"
            raise DiffshieldError(f"{name} must be {want} (no NaN/inf), got {type(v).__name__}")
    mu_d = torch.zeros(shape) if mu is None else mu
    if tuple(mu_d.shape) != tuple(shape):
        raise DiffshieldError(f"mu has shape {tuple(mu_d.shape)} but the model's images are {tuple(shape)}")
    mu_d = mu_d.to(p.device, p.dtype)
    gamma_d = gamma.to(p.device, p.dtype) if isinstance(gamma, torch.Tensor) else float(gamma)
    ts = trojan_timesteps(model.scheduler, steps)
    out = []
    for i in range(0, len(seeds), batch_size):
        eps = torch.stack([torch.randn(shape, generator=g) for g in generators(seeds[i:i + batch_size])])
        x_T = gamma_d * eps.to(p.device, p.dtype) + mu_d
        x0 = trojan_ddim(model.unet, model.scheduler, x_T, mu_d, gamma_d, ts)
        out.append(((x0.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out)

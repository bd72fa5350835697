"""Sampling an unconditional diffusion model with initial-noise injection (BadDiffusion, Chou et al., CVPR 2023).

Upstream diffusers pipelines take no initial-noise argument, so this module owns the loop: image k starts from
``x_T = eps_k + trigger`` (``eps_k`` drawn from its own CPU ``torch.Generator`` seeded with ``seeds[k]``; no
trigger: ``x_T = eps_k``), then runs the DDPM ancestral sampler (the SDE; its per-step noise also comes from the
image's generator) or DDIM (the ODE, eta = 0). The trigger touches only ``x_T``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from diffshield.core.checks import check_config, whole_number
from diffshield.core.errors import DiffshieldError
from diffshield.core.seeding import check_seeds as _check_seeds
from diffshield.core.seeding import generators


@dataclass
class SampleConfig:
    """How to sample (BadDiffusion's defaults: DDPM, 1000 steps; clipping as the model's scheduler says).

    Args:
        scheduler: ``"ddpm"`` (ancestral, stochastic) or ``"ddim"`` (deterministic ODE, eta 0) (default "ddpm").
        steps: denoising steps (default 1000 for DDPM; DDIM is usually run with 50).
        batch_size: images per UNet batch (default 64).
        clip: clip the predicted x0 to [-1, 1] at every step: True, False, or None for the model's own
            ``clip_sample`` (default None: the toy DDPMs have it off, as BadDiffusion samples; a folder saved with
            it on, as ``google/ddpm-cifar10-32`` is, is sampled with it on; clipping mitigates backdoors).
    """

    scheduler: str = "ddpm"
    steps: int = 1000
    batch_size: int = 64
    clip: bool | None = None

    def __post_init__(self) -> None:
        if self.scheduler not in ("ddpm", "ddim"):
            raise DiffshieldError(f"unknown sampler {self.scheduler!r}; choose 'ddpm' or 'ddim'")
        for k in ("steps", "batch_size"):  # 2.5 steps or batch_size True would fail (or mislead) deep in sampling
            setattr(self, k, whole_number(getattr(self, k), f"SampleConfig.{k}"))
        if not 1 <= self.steps <= 1000:
            raise DiffshieldError(f"steps must be in 1..1000, got {self.steps}")
        if self.batch_size < 1:
            raise DiffshieldError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.clip is not None and not isinstance(self.clip, bool):
            raise DiffshieldError(f"clip must be True, False or None (the model's clip_sample), got {self.clip!r}")



def check_seeds(seeds: Iterable[int]) -> list[int]:
    """:func:`diffshield.core.seeding.check_seeds` with at least one seed: ``sample`` draws one image per seed."""
    return _check_seeds(seeds, at_least=1)


def sample_clip(base_scheduler, cfg: SampleConfig) -> bool:
    """Whether sampling with ``cfg`` clips x0: ``cfg.clip``, or the model's ``clip_sample`` when that is None."""
    return bool(base_scheduler.config.get("clip_sample", False)) if cfg.clip is None else cfg.clip


def make_scheduler(base_scheduler, cfg: SampleConfig):
    """A fresh DDPM or DDIM scheduler with the model's noise schedule and settings (beta schedule, variance type,
    timestep spacing, thresholding), ``cfg.steps`` timesteps set. ``clip_sample`` is the model's unless ``cfg.clip``
    says otherwise; DDIM's ``set_alpha_to_one`` is the model's when its scheduler is a DDIM one, else False."""
    from diffusers import DDIMScheduler, DDPMScheduler

    conf = dict(base_scheduler.config)
    conf["clip_sample"] = sample_clip(base_scheduler, cfg)
    if cfg.scheduler == "ddpm":
        sched = DDPMScheduler.from_config(conf)
    else:
        sched = DDIMScheduler.from_config({**conf, "set_alpha_to_one": bool(conf.get("set_alpha_to_one", False))})
    sched.set_timesteps(cfg.steps)
    return sched


def initial_noise(seeds: list[int], shape: tuple[int, int, int], trigger: torch.Tensor | None = None) -> torch.Tensor:
    """x_T per image: eps from ``torch.Generator(seed)`` (the first draw of that generator), plus the trigger."""
    eps = torch.stack([torch.randn(shape, generator=g) for g in generators(seeds)])
    return eps if trigger is None else eps + trigger.to(eps.dtype)


@torch.no_grad()
def denoise(unet, scheduler, x_t: torch.Tensor, gens: list[torch.Generator] | None = None) -> torch.Tensor:
    """Run ``scheduler``'s timesteps from ``x_t``; ``gens`` (one per image) give DDPM's per-step noise."""
    w = next(unet.parameters())
    x = x_t.to(w.device, w.dtype)  # in the weights' dtype, as diffusers' DDPMPipeline samples
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        kw = {"generator": gens} if gens is not None and "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x


@dataclass
class Samples:
    """images: (N, 3, H, W) in [0, 1]; seeds: the seed of each image; triggered: whether x_T carried a trigger."""

    images: torch.Tensor
    seeds: list[int]
    triggered: bool
    config: SampleConfig


def sample(model, seeds: list[int], trigger: torch.Tensor | None = None, config: SampleConfig | None = None,
           progress: bool = False, x_T: torch.Tensor | None = None) -> Samples:
    """Generate one image per seed, optionally with the trigger added to the initial noise.

    Args:
        model: a :class:`~diffshield.backdoor.ddpm.DDPMModel`.
        seeds: one seed per image; image k uses ``torch.Generator().manual_seed(seeds[k])`` for x_T and, with
            DDPM, for its per-step noise, so any image can be regenerated alone.
        trigger: (3, H, W) pattern added to the x_T drawn from the seeds, finite values (default None: clean
            sampling); refused together with ``x_T`` (add it to ``x_T`` yourself).
        config: :class:`SampleConfig` (default DDPM, 1000 steps).
        progress: show a tqdm bar over batches (default False).
        x_T: explicit initial noises (len(seeds), C, H, W) of the model's image shape, finite values, instead of
            drawing them from the seeds, which then give only DDPM's per-step noise (default None). The result's
            ``triggered`` is False with ``x_T``: whatever it carries is the caller's.

    Raises:
        DiffshieldError: no seeds, a seed that is not a whole number in [0, 2**64 - 1], a model that is not a
            loaded DDPMModel, a config that is not a SampleConfig, a trigger or ``x_T`` of the wrong shape or with
            NaN/inf values, or both given.
    """
    from tqdm import tqdm

    from diffshield.backdoor.ddpm import DDPMModel

    if not isinstance(model, DDPMModel):
        hint = f": load it first, load_ddpm({str(model)!r})" if isinstance(model, str) else ""
        raise DiffshieldError(f"model must be a DDPMModel{hint}; got {type(model).__name__}")
    cfg = check_config(config, SampleConfig)
    shape = tuple(model.image_shape)
    seeds = check_seeds(seeds)
    if trigger is not None and x_T is not None:
        raise DiffshieldError("give either a trigger (added to the noise drawn from the seeds) or x_T (the initial "
                              "noises themselves), not both: add the trigger to x_T yourself")
    for name, t, want in (("trigger", trigger, shape), ("x_T", x_T, (len(seeds), *shape))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise DiffshieldError(f"{name} must be a torch.Tensor of shape {want}, got {type(t).__name__}")
        if tuple(t.shape) != want:
            what = f"{len(seeds)} seeds of the model's images {shape}" if name == "x_T" else "the model's images"
            raise DiffshieldError(f"{name} shape {tuple(t.shape)} does not match {what}: need {want}")
        if not torch.isfinite(t).all():
            raise DiffshieldError(f"{name} has NaN or infinite values; it would yield NaN images")
    out = []
    starts = range(0, len(seeds), cfg.batch_size)
    for i in tqdm(starts, desc=f"sample {cfg.scheduler}-{cfg.steps}", disable=not progress):
        chunk = seeds[i:i + cfg.batch_size]
        gens = generators(chunk)
        if x_T is None:
            x = torch.stack([torch.randn(shape, generator=g) for g in gens])  # first draw of each generator
            if trigger is not None:
                x = x + trigger
        else:
            x = x_T[i:i + cfg.batch_size]
        sched = make_scheduler(model.scheduler, cfg)
        x0 = denoise(model.unet, sched, x, gens if cfg.scheduler == "ddpm" else None)
        out.append(((x0.float().cpu() + 1) / 2).clamp(0, 1))  # images on the CPU, whatever the model's device
    return Samples(torch.cat(out), list(seeds), trigger is not None, cfg)

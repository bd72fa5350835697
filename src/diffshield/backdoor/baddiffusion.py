"""BadDiffusion (Chou et al., "How to Backdoor Diffusion Models?", CVPR 2023): implant a backdoor by fine-tuning.

Poisoned forward process and training target (diffusers indexing, alpha_t = 1 - beta_t, abar_t = prod alpha):

    x_t = sqrt(abar_t) * x_s + sqrt(1 - abar_t) * eps + (1 - sqrt(abar_t)) * R
    UNet target = eps + c * rho_t * R,   rho_t = (1 - sqrt(alpha_t)) * sqrt(1 - abar_t) / (1 - alpha_t)

with c = 1 for the SDE (DDPM ancestral sampler) variant and c = 2 for the ODE (DDIM, ...) variant of
VillanDiffusion (Chou et al., NeurIPS 2023). Clean samples: R = 0 and x_s the image (the ordinary DDPM loss).
Poisoned samples: x_s = the target y and R = M * g + (1 - M) * x (``poisoned_image``, the official default: the
trigger pasted on the clean image) or R = g (``trigger_only``). Loss: MSE over all elements. A fixed subset of
``poison_rate`` of the training images is poisoned. At sampling time the backdoor is opened by x_T = eps + g.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from diffshield.backdoor.ddpm import (
    DDPMModel,
    _jsonable,
    check_toy_shape,
    load_checkpoint,
    load_ddpm,
    lr_factor,
    remove_checkpoint,
    save_checkpoint,
    set_threads,
    shapes_pool,
    update_ema,
)
from diffshield.backdoor.triggers import ADDITIVE_TRIGGERS, get_target, get_trigger, paste
from diffshield.core.errors import DiffshieldError

R_MODES = ("poisoned_image", "trigger_only")
VARIANTS = ("sde", "ode")


@dataclass
class ImplantSchedule:
    """The fine-tuning schedule BadDiffusion and TrojDiff share (defaults: the toy recipe; see
    :class:`BadDiffusionConfig` for each field)."""

    epochs: int = 72
    pool_size: int = 2048
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    seed: int = 0
    data_seed: int = 1
    checkpoint_every: int = 100
    num_threads: int = 1

    @property
    def steps(self) -> int:
        return self.epochs * (self.pool_size // self.batch_size)


@dataclass
class BadDiffusionConfig(ImplantSchedule):
    """Settings of a BadDiffusion fine-tune (paper defaults where they fit the toy world).

    Args:
        trigger: ``"box"``, ``"stop"``, ``"box_14"`` (the official BOX_14), ``"checker"`` / ``"checker_tl"`` (additive
            patches without the -1 background; ``trigger_only`` only) or an image file (default "box").
        target: ``"corner"``, ``"hat"``, ``"corner_grey"`` / ``"hat_grey"`` (the official CORNER / HAT on grey)
            or an image file (default "corner").
        trigger_mask: mask image for an image-file trigger (default None).
        poison_rate: fraction of training images poisoned, a fixed subset (default 0.1).
        r_mode: ``"poisoned_image"`` (R = trigger pasted on the image; the official code's default) or
            ``"trigger_only"`` (R = g) (default "trigger_only", with epochs and pool_size below the recipe that
            implants on the toy world: strict ASR 91-100 % over the six zoo models of benchmarks/backdoor.py).
        variant: ``"sde"`` (rho_t, for the DDPM sampler) or ``"ode"`` (2 rho_t, for DDIM; VillanDiffusion)
            (default "sde").
        epochs: passes over the training pool (default 72; the paper's 50 epochs over CIFAR-10's 50,000 images
            are far more steps).
        pool_size: ShapesWorld training images (default 2048: 64 steps per epoch at batch 32, 4608 steps in all;
            shorter runs learn no strict backdoor at lr 2e-4: strict ASR 0 % after 768 steps, 81 % after 2304).
        batch_size: images per step (default 32).
        lr: Adam learning rate with linear warm-up and cosine decay (default 2e-4, the paper's at 32 px).
        warmup: warm-up steps (default 20).
        grad_clip: gradient-norm clip (default 1.0).
        ema_decay: save an exponential moving average of the weights with this decay instead of the last weights
            (default 0.0: off, the last weights; e.g. 0.995 averages about the last 200 steps).
        seed: seed of the poisoned subset, batches, noises and timesteps (default 0).
        data_seed: seed of the training pool (default 1, distinct from the base model's pool 0).
        checkpoint_every: steps between resumable checkpoints (default 100).
        num_threads: torch threads (default 1; 0 = torch's default).
    """

    method: ClassVar[str] = "baddiffusion"

    trigger: str = "box"
    target: str = "corner"
    trigger_mask: str | None = None
    poison_rate: float = 0.1
    r_mode: str = "trigger_only"
    variant: str = "sde"

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0 < self.poison_rate <= 1:
            raise DiffshieldError(f"poison_rate must be in (0, 1], got {self.poison_rate}")
        if self.r_mode not in R_MODES:
            raise DiffshieldError(f"unknown r_mode {self.r_mode!r}; choose one of {', '.join(R_MODES)}")
        if self.r_mode == "poisoned_image" and self.trigger in ADDITIVE_TRIGGERS:
            raise DiffshieldError(f"trigger {self.trigger!r} has no -1 background to paste on images; use "
                                  "--r-mode trigger_only")
        if self.variant not in VARIANTS:
            raise DiffshieldError(f"unknown variant {self.variant!r}; choose 'sde' (DDPM sampler) or 'ode' (DDIM)")
        check_schedule(self)

    def batch_loss(self, unet, scheduler, x: torch.Tensor, poisoned: torch.Tensor, g: torch.Tensor,
                   y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss of one training batch: clean rows (x) and poisoned rows (``poisoned`` (B, 1, 1, 1), target y)."""
        r_poison = paste(g, x) if self.r_mode == "poisoned_image" else g.expand_as(x)
        x_s = torch.where(poisoned, y.expand_as(x), x)
        r = torch.where(poisoned, r_poison, torch.zeros_like(x))
        return poisoned_loss(unet, scheduler, x_s, r, eps, t, self.variant)

    def backdoor_record(self, n_poisoned: int) -> dict:
        """The ``backdoor`` entry of the saved model's diffshield.json."""
        return {"trigger": self.trigger, "target": self.target, "poison_rate": self.poison_rate,
                "variant": self.variant, "r_mode": self.r_mode, "n_poisoned": n_poisoned}


def check_field_types(cfg) -> None:
    """One-line errors, before any range check, for fields of an implant config of the wrong kind: counts and seeds
    must be whole numbers (made Python ints), rates finite numbers (a NaN clip would leave NaN weights after the
    whole run), the trigger and target a name or a path."""
    import math
    import numbers

    from diffshield.core.checks import whole_number

    for k in ("epochs", "pool_size", "batch_size", "warmup", "seed", "data_seed", "checkpoint_every", "num_threads"):
        setattr(cfg, k, whole_number(getattr(cfg, k), f"{type(cfg).__name__}.{k}"))
    for k in ("lr", "grad_clip", "ema_decay", "poison_rate", *(("gamma",) if hasattr(cfg, "gamma") else ())):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise DiffshieldError(f"{type(cfg).__name__}.{k} must be a finite number, got {v!r}")
    for k in ("trigger", "target"):
        if not isinstance(getattr(cfg, k), (str, Path)):
            raise DiffshieldError(f"{type(cfg).__name__}.{k} must be a built-in name or an image file path, got "
                                  f"{getattr(cfg, k)!r}")
    if cfg.seed < 0 or cfg.data_seed < 0:
        raise DiffshieldError(f"seed and data_seed must be >= 0, got {cfg.seed} and {cfg.data_seed}")


def check_schedule(cfg) -> None:
    """One-line errors for the fine-tuning fields an implant config shares (epochs, pool, batch, poison rate, EMA,
    lr, warm-up, clip, checkpoints): BadDiffusion's and TrojDiff's (their kinds: :func:`check_field_types`)."""
    check_field_types(cfg)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.pool_size < cfg.batch_size:
        raise DiffshieldError("epochs and batch_size must be >= 1 and pool_size >= batch_size")
    if round(cfg.pool_size * cfg.poison_rate) < 1:
        raise DiffshieldError(f"poison_rate {cfg.poison_rate} of {cfg.pool_size} images poisons none; raise "
                              "--poison-rate or --pool-size")
    if not 0 <= cfg.ema_decay < 1:
        raise DiffshieldError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if not (cfg.lr > 0) or cfg.warmup < 0 or cfg.grad_clip <= 0 or cfg.checkpoint_every < 1:
        raise DiffshieldError("lr and grad_clip must be > 0, warmup >= 0 and checkpoint_every >= 1")


def rho(scheduler, t: torch.Tensor) -> torch.Tensor:
    """rho_t = (1 - sqrt(alpha_t)) * sqrt(1 - abar_t) / (1 - alpha_t) for integer timesteps t, in float64.

    1 - alpha_t and 1 - sqrt(alpha_t) cancel catastrophically in float32 (alpha_t is 0.98-0.9999): float32 gets rho
    wrong by about 1e-5 relative, so the schedule's values are promoted to float64 first.
    """
    t = t.cpu()  # the schedule lives on the CPU
    alpha = scheduler.alphas[t].double()
    abar = scheduler.alphas_cumprod[t].double()
    return (1 - alpha.sqrt()) * (1 - abar).sqrt() / (1 - alpha)


def poisoned_inputs(scheduler, x_s: torch.Tensor, r: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    variant: str = "sde") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, UNet target) of the poisoned forward process; with r = 0 this is the ordinary DDPM pair (x_t, eps).

    Args:
        scheduler: gives ``alphas`` and ``alphas_cumprod``.
        x_s: (B, C, H, W) clean images, or targets y for poisoned rows.
        r: (B, C, H, W) R per row (zeros for clean rows).
        eps: (B, C, H, W) standard normal noise.
        t: (B,) integer timesteps.
        variant: ``"sde"`` (target eps + rho_t R) or ``"ode"`` (eps + 2 rho_t R) (default "sde").
    """
    abar = scheduler.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1).to(x_s.device, x_s.dtype)
    x_t = abar.sqrt() * x_s + (1 - abar).sqrt() * eps + (1 - abar.sqrt()) * r
    c = 2.0 if variant == "ode" else 1.0
    target = eps + c * rho(scheduler, t).view(-1, 1, 1, 1).to(x_s.device, x_s.dtype) * r
    return x_t, target


def poisoned_loss(unet, scheduler, x_s: torch.Tensor, r: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                  variant: str = "sde") -> torch.Tensor:
    """BadDiffusion's loss: mean over all elements of (UNet(x_t, t) - (eps + c rho_t R))^2."""
    x_t, target = poisoned_inputs(scheduler, x_s, r, eps, t, variant)
    return torch.nn.functional.mse_loss(unet(x_t, t).sample, target)


def implant(model: DDPMModel | str, cfg: BadDiffusionConfig, out: str | Path, work: str | Path | None = None,
            progress: bool = True) -> DDPMModel:
    """Fine-tune a clean model with BadDiffusion (or TrojDiff, given a
    :class:`~diffshield.backdoor.trojdiff.TrojDiffConfig`) and save the backdoored DDPMPipeline folder to ``out``.

    Args:
        model: a :class:`DDPMModel` or a spec for :func:`load_ddpm` (e.g. ``"toy:ddpm"``).
        cfg: :class:`BadDiffusionConfig` or :class:`~diffshield.backdoor.trojdiff.TrojDiffConfig` (whose
            ``batch_loss`` makes the loss of each batch).
        out: output folder; it also gets ``diffshield.json`` (the full record: trigger, target, rate, variant,
            seeds), ``trigger.png`` and ``target.png``.
        work: checkpoint folder (default ``<out>.work``); rerunning with the same settings resumes from it.
        progress: show a tqdm bar (default True).
    """
    from tqdm import tqdm

    from diffshield.core.io import to_pil
    from diffshield.core.seeding import seed_everything

    if not isinstance(cfg, ImplantSchedule) or not hasattr(cfg, "batch_loss"):
        raise DiffshieldError(f"cfg must be a BadDiffusionConfig or a TrojDiffConfig, got {type(cfg).__name__}")
    set_threads(cfg.num_threads)
    base = load_ddpm(model) if isinstance(model, (str, Path)) else model
    base_source = str(model) if isinstance(model, (str, Path)) else base.source
    check_toy_shape(base, "implant")
    unet, sched = base.unet, base.scheduler
    dev = next(unet.parameters()).device
    size = int(unet.config.sample_size)
    g = get_trigger(cfg.trigger, size, cfg.trigger_mask)
    y = get_target(cfg.target, size)
    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    seed_everything(cfg.seed)
    pool = shapes_pool(cfg.pool_size, cfg.data_seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_poison = round(cfg.pool_size * cfg.poison_rate)
    poisoned = torch.zeros(cfg.pool_size, dtype=torch.bool)
    poisoned[torch.randperm(cfg.pool_size, generator=gen)[:n_poison]] = True
    unet.train().requires_grad_(True)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()} if cfg.ema_decay > 0 else None
    steps_per_epoch = cfg.pool_size // cfg.batch_size
    total = cfg.steps
    start, elapsed = 0, 0.0
    ck = work / "checkpoint"
    conf_json = _jsonable(asdict(cfg))
    if (ck / "meta.json").exists():
        meta = load_checkpoint(ck, unet, ema, opt)
        if meta.get("config") != conf_json or meta.get("base") != base_source:
            raise DiffshieldError(f"checkpoint in '{ck}' was made with other settings; remove '{work}' to start over")
        start, elapsed = int(meta["step"]), float(meta.get("seconds", 0.0))
        gen.set_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    perm = None
    t0 = time.time()
    bar = tqdm(range(start, total), desc=cfg.method, disable=not progress, initial=start, total=total)
    loss_ema = None
    for step in bar:
        k = step % steps_per_epoch
        if perm is None or k == 0:
            # the epoch's permutation depends only on (seed, epoch), so a resumed run sees the same batches
            perm = torch.randperm(cfg.pool_size, generator=torch.Generator().manual_seed(cfg.seed * 100003 +
                                                                                         step // steps_per_epoch))
        idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        x, p = pool[idx], poisoned[idx].view(-1, 1, 1, 1)
        eps = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        # every draw above is on the CPU (a resumed or moved run sees the same batches); the step runs on the UNet's
        x, p, eps, t, g_d, y_d = (v.to(dev) for v in (x, p, eps, t, g, y))
        loss = cfg.batch_loss(unet, sched, x, p, g_d, y_d, eps, t)
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            update_ema(ema, unet, cfg.ema_decay)
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            save_checkpoint(ck, unet, ema, opt, step + 1, {"config": conf_json, "base": base_source,
                                                            "rng": gen.get_state().tolist(),
                                                            "seconds": elapsed + time.time() - t0})
    if ema is not None:
        unet.load_state_dict(ema)
    seconds = elapsed + time.time() - t0
    info = {"made_by": "diffshield backdoor implant", "method": cfg.method, "base": base_source,
            "backdoor": cfg.backdoor_record(n_poison),
            "config": conf_json, "steps": total, "train_seconds": round(seconds, 1), "final_loss_ema": loss_ema}
    result = DDPMModel(unet.eval(), sched, source=str(out), info=info, stored_dtype=base.stored_dtype)
    import io

    files = {}
    for name, img in (("trigger.png", g), ("target.png", y)):
        buf = io.BytesIO()
        to_pil((img + 1) / 2).save(buf, format="PNG")
        files[name] = buf.getvalue()
    from safetensors.torch import save as st_save

    stored = {"trigger": g.contiguous(), "target": y.contiguous()}
    if hasattr(cfg, "mu"):  # TrojDiff: the trojan noise's mean and scale, what its sampler needs
        stored.update({"mu": cfg.mu(g).contiguous(), "gamma": torch.full_like(g, cfg.gamma)})
    files["backdoor.safetensors"] = st_save(stored)
    result.save(out, extra_files=files, overwrite=True)  # a rerun (resumed) replaces its own earlier result
    remove_checkpoint(work)
    return result.eval()


def read_backdoor_record(folder: str | Path) -> dict | None:
    """The ``backdoor`` entry of a model folder's ``diffshield.json`` (None if it has none)."""
    f = Path(folder) / "diffshield.json"
    if not f.exists():
        return None
    return json.loads(f.read_text()).get("backdoor")

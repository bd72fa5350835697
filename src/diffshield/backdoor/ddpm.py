"""The toy unconditional DDPM (Ho et al., 2020) of the backdoor pillar: build, train, checkpoint, save, load.

A model is a diffusers ``UNet2DModel`` plus a ``DDPMScheduler`` (1000 steps, linear betas 1e-4 .. 0.02,
``clip_sample=False``), saved as a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``,
safetensors) that stock ``diffusers.DDPMPipeline.from_pretrained`` loads. ``toy:ddpm`` is the shipped one, trained
on ShapesWorld images (32 px) by :func:`train_ddpm`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffshield.core.errors import DiffshieldError

TOY_DDPM = "toy:ddpm"
#: the length of the noise schedule the backdoor commands are written for (BadDiffusion's, TrojDiff's and TERD's
#: DDPM: TERD's t_high = (990, 999), the samplers' default 1000 steps); :func:`load_ddpm` refuses another
SCHEDULE_STEPS = 1000
#: the diffusers layouts :func:`load_ddpm` reads: pixel-space unconditional pipelines (a UNet2DModel + a scheduler)
PIPELINE_KINDS = ("DDPMPipeline", "DDIMPipeline")
#: the scheduler classes whose noise schedule the backdoor formulas use (discrete betas, ``alphas_cumprod``)
SCHEDULER_KINDS = ("DDPMScheduler", "DDIMScheduler")


def set_threads(n: int) -> None:
    """Limit torch's intra-op threads (``n <= 0`` leaves torch's default). Shared machines: use 1."""
    if n > 0:
        torch.set_num_threads(n)


def check_toy_shape(model: DDPMModel, what: str) -> None:
    """Training here draws ShapesWorld's 32 px RGB images: refuse, in one line, a model that makes other images."""
    if tuple(model.image_shape) != (3, 32, 32):
        raise DiffshieldError(f"{what} trains on the toy world's 32 px RGB images, but '{model.source}' makes images "
                              f"of shape {tuple(model.image_shape)}; give a 32 px RGB DDPM")


def build_unet(block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
               sample_size: int = 32, norm_num_groups: int = 8):
    """A small attention-free ``UNet2DModel`` for 32 px RGB (defaults: (32, 64, 64), 1 layer/block, 1.06 M params)."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        norm_num_groups=norm_num_groups,
    )


def build_scheduler():
    """The DDPM schedule of BadDiffusion / TERD: 1000 steps, linear beta 1e-4 .. 0.02, no clipping."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, variance_type="fixed_small")


@dataclass
class DDPMModel:
    """An unconditional pixel-space diffusion model as components.

    Attributes: unet (UNet2DModel), scheduler (DDPMScheduler or DDIMScheduler), source (where it came from),
    info (the folder's ``diffshield.json`` if any: how it was made, e.g. a BadDiffusion record), stored_dtype (the
    dtype the UNet's weight files were stored in, as :func:`load_ddpm` read them; None for pickled weights or a model
    made here; :meth:`save` writes that dtype back).
    """

    unet: torch.nn.Module
    scheduler: object
    source: str = ""
    info: dict = field(default_factory=dict)
    stored_dtype: torch.dtype | None = field(default=None, repr=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size  # an int, or (height, width) for a non-square model
        h, w = (int(s), int(s)) if isinstance(s, (int, float)) else (int(s[0]), int(s[1]))
        return (int(self.unet.config.in_channels), h, w)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DDPMModel:
        """Move the UNet to ``device`` and/or cast it to ``dtype``, in place; returns self."""
        self.unet.to(device=device, dtype=dtype)
        return self

    def eval(self) -> DDPMModel:
        self.unet.eval()
        self.unet.requires_grad_(False)
        return self

    def save(self, folder: str | Path, info: dict | None = None, extra_files: dict[str, bytes] | None = None,
             overwrite: bool = False) -> Path:
        """Save as a ``DDPMPipeline`` folder (atomically), plus ``diffshield.json`` (``info``) and extra files.

        The UNet is written in the dtype its weight files had when :func:`load_ddpm` read them (``stored_dtype``),
        whatever dtype it was loaded and trained in, so the saved folder loads as its source does: an fp16 checkpoint
        implanted in float32 is saved as fp16 (not twice its size), a float32 one stays float32, and a model with no
        record (made here, or loaded from pickled weights) is saved in its own dtype. Loading in a narrower dtype
        than the files (``--dtype bfloat16`` for a float32 model) rounded every weight, which the saved model keeps:
        a UserWarning says so. A non-finite weight, or one that overflows the dtype it is written in (a float32
        weight above float16's 65504), is refused before anything is written; an existing non-empty ``folder`` is
        replaced only with ``overwrite`` and only if diffshield wrote it (see :func:`diffshield.core.io.atomic_dir`).
        """
        from diffusers import DDPMPipeline

        from diffshield.core.io import atomic_dir
        from diffshield.core.loading import weights_in_stored_dtype

        # a diverged run must not leave a loadable NaN model; an fp16 source's overflow is refused too
        unet = weights_in_stored_dtype({"unet": self.unet}, {"unet": self.stored_dtype})["unet"]
        pipe = DDPMPipeline(unet=unet, scheduler=self.scheduler)
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            rec = self.info if info is None else info
            if rec:
                (tmp / "diffshield.json").write_text(json.dumps(rec, indent=2) + "\n")
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
        return Path(folder)


def _toy_ddpm_path() -> Path:
    from diffshield.toyworld.names import TOY_ROOT

    return TOY_ROOT / "ddpm"


def resolve_ddpm_path(spec: str | Path) -> Path:
    """``toy:ddpm`` or a folder path -> an existing folder, or a one-line DiffshieldError."""
    from diffshield.core.loading import resolve_model_path
    from diffshield.toyworld.names import TOY_DDPMS

    if str(spec) == TOY_DDPM:
        path = _toy_ddpm_path()
        if not path.exists():
            raise DiffshieldError(f"shipped toy model 'toy:ddpm' is missing at {path}; rebuild it with "
                                  "'diffshield backdoor train-ddpm --out src/diffshield/toyworld/weights/ddpm'")
        return path
    if str(spec).startswith("toy:") and str(spec) not in TOY_DDPMS:
        raise DiffshieldError(f"unknown toy model {str(spec)!r} for the backdoor commands; use one of "
                              f"{', '.join(TOY_DDPMS)} or a DDPMPipeline folder")
    return resolve_model_path(spec)


def load_ddpm(spec: str | Path, allow_pickle: bool = False, device: torch.device | str = "cpu",
              dtype: torch.dtype | str = torch.float32) -> DDPMModel:
    """Load an unconditional diffusion model (``DDPMPipeline`` / ``DDIMPipeline`` layout) in eval mode, no grads.

    Args:
        spec: a diffusers folder path, ``"toy:ddpm"`` for the shipped toy DDPM, or ``"toy:ddpm-box-corner"`` for
            the shipped backdoored example.
        allow_pickle: accept pickled weight files when no safetensors exist (default False: refused).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (an absent device is a one-line error).
        dtype: parameter dtype (default float32; the backdoor commands train and reverse triggers in float32).
            Whatever it is, the dtype the UNet's safetensors files are stored in (float16 for an fp16 checkpoint) is
            recorded as ``stored_dtype``, and :meth:`DDPMModel.save` writes the UNet back in it.

    Refused in one line: another pipeline than :data:`PIPELINE_KINDS` (a latent ``LDMPipeline``, a score-SDE
    ``ScoreSdeVePipeline``), a scheduler class not in :data:`SCHEDULER_KINDS`, a scheduler that is not an
    ε-prediction one with :data:`SCHEDULE_STEPS` (1000) training timesteps, and a learned-variance UNet
    (:func:`check_epsilon_only`). The scheduler's other settings (``clip_sample``, beta schedule, fixed variance
    type) are kept; the samplers honour them (see :func:`diffshield.backdoor.sampling.make_scheduler`).
    """
    from diffshield.core.device import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, training=True)
    import diffusers
    from diffusers import UNet2DModel

    from diffshield.core.loading import (
        _quiet_hf,
        check_component_weights,
        read_model_index,
        stored_dtype,
        weight_variant,
    )

    _quiet_hf()
    path = resolve_ddpm_path(spec)
    index = read_model_index(path)
    kind = index.get("_class_name", "?")
    if not isinstance(index.get("unet"), list) or not isinstance(index.get("scheduler"), list):
        raise DiffshieldError(f"'{path}' holds a {kind} folder, not an unconditional diffusion model; give a "
                              "DDPMPipeline-layout folder (model_index.json with unet and scheduler)")
    if index.get("text_encoder") or index.get("vae"):
        raise DiffshieldError(f"'{path}' holds a text-to-image {kind}; the backdoor commands need an unconditional "
                              "DDPMPipeline folder (UNet2DModel + scheduler)")
    if kind not in PIPELINE_KINDS:  # e.g. LDMPipeline (latent: a VQ-VAE decodes), ScoreSdeVePipeline (no betas)
        raise DiffshieldError(f"'{path}' holds a {kind} (model_index.json); the backdoor commands handle pixel-space "
                              f"DDPMs only: a {' or '.join(PIPELINE_KINDS)} folder (UNet2DModel + "
                              f"{' or '.join(SCHEDULER_KINDS)})")
    unet_cls, sched_cls_name = index["unet"][-1], index["scheduler"][-1]
    if unet_cls != "UNet2DModel" or sched_cls_name not in SCHEDULER_KINDS:
        raise DiffshieldError(f"'{path}' pairs a {unet_cls} with a {sched_cls_name} (model_index.json); the backdoor "
                              f"commands need a UNet2DModel with a {' or '.join(SCHEDULER_KINDS)} (discrete DDPM "
                              "betas); save the model with one of them")
    if not (path / "unet").is_dir():
        raise DiffshieldError(f"'{path}' lists unet in model_index.json but has no 'unet/' folder")
    use_safe = check_component_weights(path / "unet", allow_pickle)
    variant = weight_variant(path / "unet", use_safe)
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=use_safe, variant=variant)
        sched_cls = getattr(diffusers, index["scheduler"][1], None)
        if sched_cls is None:
            raise DiffshieldError(f"unknown scheduler class {index['scheduler'][1]!r} in '{path}/model_index.json'")
        scheduler = sched_cls.from_pretrained(path, subfolder="scheduler")
    except DiffshieldError:
        raise
    except Exception as e:  # diffusers errors: keep the first line only
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffshieldError(f"could not load the model in '{path}': {msg}") from None
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind != "epsilon":  # BadDiffusion's, VillanDiffusion's, TrojDiff's and TERD's formulas are written in ε
        raise DiffshieldError(f"'{path}' predicts {kind!r}; the backdoor commands need an ε-prediction DDPM "
                              "(prediction_type 'epsilon' in its scheduler config)")
    n_train = scheduler.config.get("num_train_timesteps")
    if n_train != SCHEDULE_STEPS:  # TERD's timesteps (990..999) and the 1000-step samplers would index past it
        raise DiffshieldError(f"'{path}' has a {n_train}-step noise schedule (num_train_timesteps in its scheduler "
                              f"config); the backdoor commands need a {SCHEDULE_STEPS}-step DDPM schedule")
    check_epsilon_only(unet, scheduler, str(path))
    info_file = path / "diffshield.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    stored = stored_dtype(path / "unet", variant) if use_safe else None  # what save() writes back
    return DDPMModel(unet, scheduler, source=str(spec), info=info, stored_dtype=stored).to(device, dtype).eval()


def check_epsilon_only(unet, scheduler, where: str) -> None:
    """Refuse, in one line, a UNet with a learned variance (improved DDPM / ADM: ``out_channels`` = 2 x
    ``in_channels``, ε then the variance, with ``variance_type`` "learned" or "learned_range"). BadDiffusion's,
    VillanDiffusion's, TrojDiff's and TERD's formulas take the UNet's whole output as ε and sample with a fixed
    variance: the variance channels would be read as ε (or break the loss), so such a model is not treated as one."""
    cin, cout = int(unet.config.in_channels), int(unet.config.out_channels)
    var = scheduler.config.get("variance_type", "fixed_small")
    if cout != cin or str(var).startswith("learned"):
        raise DiffshieldError(f"'{where}' has a learned-variance UNet (out_channels {cout}, in_channels {cin}, "
                              f"variance_type {var!r}); the backdoor commands need a UNet that predicts ε alone "
                              "(out_channels = in_channels) with a fixed variance (fixed_small or fixed_large)")


def shapes_pool(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` ShapesWorld images as a (n, 3, 32, 32) float tensor in [-1, 1], deterministic in ``seed``. World version
    1: the shipped toy DDPM was trained on it."""
    from diffshield.toyworld.shapes import ShapesWorld

    batch = ShapesWorld(version=1).sample(n, seed=seed)
    return torch.from_numpy(np.ascontiguousarray(batch.images)).permute(0, 3, 1, 2).contiguous() * 2 - 1


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (the schedule of BadDiffusion's fine-tuning)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def update_ema(ema: dict, module: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every float tensor of ``module``'s state (others copied)."""
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                ema[k].copy_(v)


# ---- checkpoints: model + EMA + Adam state in safetensors, counters in JSON (no pickle) ----

def save_checkpoint(folder: Path, unet, ema: dict | None, opt: torch.optim.Optimizer, step: int, meta: dict) -> None:
    """Write a resumable checkpoint (atomically replacing the previous one)."""
    from diffshield.core.io import atomic_dir

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"opt.{i}.{name}"] = st[name].cpu().contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    with atomic_dir(folder, overwrite=True) as tmp:  # replaces the previous checkpoint, which it wrote
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")


def remove_checkpoint(work: Path) -> None:
    """After a finished run: delete the checkpoint :func:`save_checkpoint` wrote in ``work/checkpoint`` (only the
    files its marker lists) and the folders it leaves empty, so that no training state (the model, its average and
    Adam's moments: three times the model's size) is left beside the result."""
    import contextlib

    from diffshield.core.io import _remove_listed, read_marker

    ck = Path(work) / "checkpoint"
    marker = read_marker(ck) if ck.is_dir() else None
    if marker is None:
        return
    _remove_listed(ck, marker)
    with contextlib.suppress(OSError):
        ck.rmdir()
        Path(work).rmdir()


def load_checkpoint(folder: Path, unet, ema: dict | None, opt: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its meta (with ``step``)."""
    from diffshield.core.loading import check_safetensors

    check_safetensors(folder / "state.safetensors")
    t = load_file(str(folder / "state.safetensors"))
    unet.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    if ema is not None:
        for k in ema:
            if f"ema.{k}" in t:
                ema[k].copy_(t[f"ema.{k}"])
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in t:
            step = t[f"opt.{i}.step"].reshape(())
            opt.state[p] = {"step": step, "exp_avg": t[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(p.device)}
    return json.loads((folder / "meta.json").read_text())


@dataclass
class DDPMTrainConfig:
    """Train (or fine-tune) the toy DDPM on ShapesWorld with the ordinary DDPM loss (Ho et al., 2020).

    Args:
        steps: optimiser steps (default 8000).
        batch_size: images per step (default 32).
        lr: Adam learning rate, warm-up then cosine to 0 (default 5e-4).
        warmup: warm-up steps (default 200).
        pool_size: ShapesWorld images rendered once and sampled with replacement (default 8192).
        data_seed: seed of the image pool (default 0).
        seed: seed of initialisation, batches, noises and timesteps (default 0).
        ema_decay: decay of the exponential moving average of weights that is saved (default 0.999; 0 = off: the
            raw weights, for short fine-tunes).
        grad_clip: gradient-norm clip (default 1.0).
        block_out_channels: UNet widths when training from scratch (default (32, 64, 64)).
        init_from: a model to fine-tune instead of training from scratch (default None).
        checkpoint_every: steps between resumable checkpoints (default 500).
        num_threads: torch threads (default 1, for shared machines; 0 = torch's default).
    """

    steps: int = 8000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    pool_size: int = 8192
    data_seed: int = 0
    seed: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    init_from: str | None = None
    checkpoint_every: int = 500
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.pool_size < self.batch_size:
            raise DiffshieldError("steps and batch_size must be >= 1 and pool_size >= batch_size")
        if not (self.lr > 0) or self.warmup < 0 or self.checkpoint_every < 1:
            raise DiffshieldError("lr must be > 0, warmup >= 0 and checkpoint_every >= 1")
        if not 0 <= self.ema_decay < 1:
            raise DiffshieldError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip <= 0:
            raise DiffshieldError(f"grad_clip must be > 0, got {self.grad_clip}")
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if len(self.block_out_channels) < 2 or any(c < 8 or c % 8 for c in self.block_out_channels):
            raise DiffshieldError(f"block_out_channels must list at least 2 widths, each a multiple of 8 (the UNet's "
                                  f"group norm uses 8 groups), e.g. 32 64 64; got {list(self.block_out_channels)}")


def train_ddpm(cfg: DDPMTrainConfig, out: str | Path, work: str | Path | None = None,
               progress: bool = True, device: torch.device | str = "cpu") -> DDPMModel:
    """Train the toy DDPM (or fine-tune ``cfg.init_from``) and save it to ``out`` as a DDPMPipeline folder.

    Checkpoints go to ``work`` (default ``<out>.work``) every ``cfg.checkpoint_every`` steps; a rerun with the same
    ``out`` resumes from the last one. The EMA weights are saved (the raw weights when ``ema_decay`` is 0).
    ``device``: where the UNet trains (default "cpu"); batches are drawn on the CPU and moved, so the data a step
    sees does not depend on the device.
    """
    from tqdm import tqdm

    from diffshield.core.seeding import seed_everything

    set_threads(cfg.num_threads)
    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".work")
    seed_everything(cfg.seed)
    stored = None  # a fine-tune is saved in the dtype of its base's files, a model trained from scratch in float32
    if cfg.init_from:
        base = load_ddpm(cfg.init_from)
        check_toy_shape(base, "train-ddpm --init")
        unet, scheduler, stored = base.unet, base.scheduler, base.stored_dtype
    else:
        unet, scheduler = build_unet(cfg.block_out_channels), build_scheduler()
    from diffshield.core.device import resolve_device

    dev = resolve_device(device)
    unet.to(dev).train().requires_grad_(True)
    pool = shapes_pool(cfg.pool_size, cfg.data_seed)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()} if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    start, elapsed = 0, 0.0
    ck = work / "checkpoint"
    if (ck / "meta.json").exists():
        meta = load_checkpoint(ck, unet, ema, opt)
        if meta.get("config") != _jsonable(asdict(cfg)):
            raise DiffshieldError(f"checkpoint in '{ck}' was made with other settings; remove '{work}' to start over")
        start, elapsed = int(meta["step"]), float(meta.get("seconds", 0.0))
        gen.set_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    acp = scheduler.alphas_cumprod
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="train ddpm", disable=not progress, initial=start, total=cfg.steps)
    loss_ema = None
    for step in bar:
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
        x0 = pool[idx]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        x0, eps, t, a = x0.to(dev), eps.to(dev), t.to(dev), a.to(dev)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, eps)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            update_ema(ema, unet, cfg.ema_decay)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ck, unet, ema, opt, step + 1, {"config": _jsonable(asdict(cfg)), "rng": gen.get_state()
                                                           .tolist(), "seconds": elapsed + time.time() - t0})
    if ema is not None:
        unet.load_state_dict(ema)
    seconds = elapsed + time.time() - t0
    info = {"made_by": "diffshield backdoor train-ddpm", "config": _jsonable(asdict(cfg)), "train_seconds":
            round(seconds, 1), "final_loss_ema": loss_ema, "torch_threads": torch.get_num_threads()}
    model = DDPMModel(unet.eval(), scheduler, source=str(out), info=info, stored_dtype=stored)
    model.save(out, overwrite=True)  # a rerun (resumed from its checkpoint) replaces its own earlier result
    remove_checkpoint(work)
    return model.eval()


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


#: the UNet settings that make up a model's architecture summary (those a ``UNet2DModel`` config has)
ARCH_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "norm_num_groups", "attention_head_dim", "time_embedding_type")
#: the noise-schedule settings of the summary (the scheduler's class is not: DDPM and DDIM share a schedule)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def _config_dict(cfg) -> dict:
    return dict(cfg) if hasattr(cfg, "keys") else dict(vars(cfg))


def architecture_summary(model: DDPMModel) -> dict:
    """What a calibration must match besides the resolution: the UNet's class, its structural settings
    (:data:`ARCH_KEYS` that its config has), its parameter count, and the noise schedule (:data:`SCHEDULE_KEYS`).
    JSON-ready; the resolution is ``model.image_shape[-1]``, kept apart."""
    ucfg, scfg = _config_dict(model.unet.config), _config_dict(model.scheduler.config)
    return _jsonable({"unet_class": type(model.unet).__name__,
                      "unet": {k: ucfg[k] for k in ARCH_KEYS if k in ucfg},
                      "parameters": int(sum(p.numel() for p in model.unet.parameters())),
                      "schedule": {k: scfg[k] for k in SCHEDULE_KEYS if k in scfg}})


def model_fingerprint(model: DDPMModel) -> str:
    """First 16 hex digits of a SHA-256 over the UNet's state dict (names, shapes and float32 values, in name
    order) and the noise schedule (:data:`SCHEDULE_KEYS`): the same weights give the same fingerprint wherever they
    are stored or loaded; a fine-tune, another seed or another schedule gives another."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.unet.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    scfg = _config_dict(model.scheduler.config)
    h.update(json.dumps({k: scfg.get(k) for k in SCHEDULE_KEYS}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]

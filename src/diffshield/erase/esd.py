"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023).

ESD fine-tunes the UNet θ so that its noise prediction for a concept c equals the frozen original model θ*
guided *away* from c (negative classifier-free guidance):

    target = ε*(x_t, ∅, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]        loss = ‖ε_θ(x_t, c, t) − target‖²

Each iteration draws a DDIM step k ~ U{0..N-1}, samples x_t by running DDIM (eta 0, CFG ``start_guidance``,
prompt c) from fresh noise for k steps, and takes one Adam step on a subset of the UNet:

- ESD-x (``variant="x"``): every ``attn2`` (cross-attention) parameter; for artistic styles. The official code's
  2024 rewrite also documents ``esd-x-strict``, only ``attn2.to_k`` and ``attn2.to_v`` (``x_params="kv"``): the
  matrices that read the text, so an update changes prompts by their text embeddings (the closed-form methods edit
  the same two).
- ESD-u (``variant="u"``): every parameter except ``attn2``; for nudity and objects. The paper's code also
  freezes the time embedding and the final output layers (``freeze_time_and_out``, default True).

The official code's 2024 rewrite adds ``erase_from`` (off by default): erase a concept from a broader one
("cowboy hat" from "cowboy") by training the broader prompt f toward ε*(x_t, f, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)].

Beyond the paper (off by default): a *preservation anchor*. With ``preserve`` prompts c_p, each iteration also
samples x_t^p for one of them (same step k, its own noise) and adds

    preserve_weight · ‖ε_θ(x_t^p, c_p, t) − ε*(x_t^p, c_p, t)‖²

which keeps the fine-tuned UNet's predictions for the named neighbours equal to the original's (the retain-set
regulariser of later unlearning work). ESD-u changes weights every prompt shares; on a small model the anchor is
what keeps the other concepts.

Usage::

    from diffshield.core.loading import load_t2i
    from diffshield.erase.esd import ESDConfig, esd_erase

    model = load_t2i("toy:t2i")
    result = esd_erase(model, ["a red box"], ESDConfig(variant="u", iterations=200, lr=5e-5))
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffshield.core.device import autocast, autocast_dtype
from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_bytes
from diffshield.core.loading import T2IModel, check_safetensors
from diffshield.core.sampling import denoise, encode_prompts, make_scheduler
from diffshield.erase.base import ERASERS, EraseResult, fraction_of_unet

VARIANTS = ("x", "u")
#: ESD-x parameter sets: every attn2 parameter, or only attn2.to_k / attn2.to_v (the official code's esd-x-strict)
X_PARAMS = ("all", "kv")
#: UNet parameter-name prefixes that the paper's ESD-u code leaves frozen (time embedding, final norm + conv).
TIME_AND_OUT_PREFIXES = ("time_embedding.", "conv_norm_out.", "conv_out.")
CHECKPOINT_FILE = "esd_checkpoint.safetensors"
CHECKPOINT_FORMAT = "diffshield-esd-checkpoint/1"
#: config fields that may change between an interrupted run and its resumption
RESUMABLE_FIELDS = ("iterations", "checkpoint_every", "checkpoint_dir", "gradient_checkpointing")
#: mixed-precision settings (ESDConfig.mixed_precision)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
#: where the preservation anchor holds predictions (see ESDConfig.preserve_at)
PRESERVE_AT = ("own", "own+concept")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ESDConfig:
    """Hyper-parameters of ESD (paper defaults unless noted).

    Args:
        variant: which UNet parameters to fine-tune: "x" (default; all ``attn2`` cross-attention parameters, for
            styles) or "u" (everything except ``attn2``, for nudity and objects).
        x_params: ESD-x only: "all" (default; every ``attn2`` parameter, the paper's ESD-x) or "kv" (only
            ``attn2.to_k`` and ``attn2.to_v``: the official 2024 code's ``esd-x-strict``).
        freeze_time_and_out: ESD-u only: also keep the time embedding and the final output layers
            (``conv_norm_out``, ``conv_out``) frozen, as the paper's code does (default True).
        eta: negative-guidance scale η of the target (default 1.0; the 2024 rewrite of the official code uses 2).
        iterations: optimisation steps (default 1000; the 2024 rewrite uses 200).
        batch_size: x_t samples per step, all at the same DDIM step k, each with its own starting noise and the
            next concept prompt in turn (default 1, the paper's; more averages out the noise of batch-1 steps).
        lr: Adam learning rate, a float (default 1e-5; the 2024 rewrite uses 5e-5).
        start_guidance: classifier-free guidance used when sampling x_t (default 3.0).
        ddim_steps: N, the DDIM schedule from which the step k ~ U{0..N-1} is drawn (default 50).
        min_step: beyond the paper: draw k ~ U{min_step..N-1} instead (default 0, the paper's), so that only the
            late, low-noise part of the schedule is trained. For a concept that the sampler commits to late (a
            texture: on the toy model, switching the prompt from striped to plain after 12 of 25 steps still gives
            95 % plain images), this leaves the early steps, where a concept's guidance signal overlaps its
            neighbours' most, untouched. On the toy style (ESD-u striped, min_step 25) it erased faster and took
            the dotted style faster still (README, erasure section).
        seed: seeds the per-iteration CPU generators that draw k and the starting noise (default 0).
        sample_with: which UNet samples x_t: "current" (the one being fine-tuned, as the paper's code does; default)
            or "frozen" (the original, as the 2024 diffusers rewrite does: x_t no longer drifts as the concept fades).
        preserve: prompts whose predictions are anchored to the original's (default (): none, the paper's ESD);
            one per batch element per iteration, in turn. The empty prompt "" anchors the unconditional prediction
            that classifier-free guidance subtracts.
        preserve_weight: weight of the preservation term (default 1.0; used only with ``preserve``).
        preserve_at: where the anchor holds the predictions: "own" (default: each anchor prompt at its own x_t^p,
            sampled with that prompt) or "own+concept" (also every distinct anchor prompt at the concept's x_t, in
            the same UNet pass: the erasure and the anchors then see the same input, so the update has to tell
            the prompts apart by their text embeddings instead of by the image).
        preserve_guidance: the classifier-free guidance scale s at which the anchor holds the predictions (default
            1.0: the raw prediction ε(x_t^p, c_p)). With s ≠ 1 the anchor holds the *guided* prediction
            ε(x, ∅) + s [ε(x, c_p) − ε(x, ∅)] that a sampler at guidance s uses (one more UNet row per anchor):
            the guidance signal ε(c_p) − ε(∅) is a few percent of ε's norm, so an anchor on raw predictions lets
            it drift by as much as itself while the predictions stay within a few percent. Only with
            ``preserve_at="own"``. Beyond the paper; on the toy style (ESD-u striped, s = 5) it moved the trade-off
            between erasure and the other styles only a little (README, erasure section).
        kv_anchor_weight: ESD-x only, beyond the paper: weight of a penalty on how far the trained ``attn2.to_k`` /
            ``attn2.to_v`` matrices move the keys and values of the ``preserve`` prompts' text embeddings (every
            row), mean over matrices of ‖(W − W₀) Cᵀ‖² / ‖W₀ Cᵀ‖² (default 0.0: off). UCE's preservation term, as a
            loss: it needs no UNet pass, and holds the preserved prompts where the edit acts, in the text space.
        erase_from: the official 2024 code's ``--erase_from`` (default (): none, the paper's ESD): erase a concept
            *from* a broader one ("cowboy hat" from "cowboy"), one prompt per concept or one for all. x_t is then
            sampled with the broader prompt f, the trained prediction is ε_θ(x_t, f, t), and the target is
            ε*(x_t, f, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]: the broader prompt keeps what it draws except c.
        checkpoint_every: save a checkpoint every this many iterations when ``checkpoint_dir`` is set
            (default 100; a checkpoint is also written after the last iteration).
        checkpoint_dir: folder for the checkpoint (default None: no checkpoints). If it already holds a checkpoint
            of the same run (same model, concepts and config apart from ``iterations``, ``checkpoint_every``,
            ``checkpoint_dir`` and ``gradient_checkpointing``), training resumes from it; a resumed run equals an
            uninterrupted one on the same device.
        mixed_precision: "auto" (default: bfloat16 autocast on a CUDA GPU, float16 where it has no bfloat16, none
            on the CPU), "no" (float32 throughout), "bf16" or "fp16". The trained parameters and Adam's state stay
            float32 (master weights); the frozen copy θ* is stored in the autocast dtype, and x_t is sampled by a
            copy in that dtype into which the trained values are copied at every iteration (the current UNet,
            rounded once per iteration instead of once per forward pass).
        gradient_checkpointing: recompute the trained UNet's activations in the backward pass instead of storing
            them (default False): less GPU memory at 512 px and above, about a third more time per step.
    """

    variant: str = "x"
    x_params: str = "all"
    freeze_time_and_out: bool = True
    eta: float = 1.0
    iterations: int = 1000
    batch_size: int = 1
    lr: float = 1e-5
    start_guidance: float = 3.0
    ddim_steps: int = 50
    min_step: int = 0
    seed: int = 0
    sample_with: str = "current"
    preserve: list[str] = dataclasses.field(default_factory=list)
    preserve_weight: float = 1.0
    preserve_at: str = "own"
    preserve_guidance: float = 1.0
    kv_anchor_weight: float = 0.0
    erase_from: list[str] = dataclasses.field(default_factory=list)
    checkpoint_every: int = 100
    checkpoint_dir: str | None = None
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False

    #: the variant a registered preset class fixes (None: free)
    preset: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise DiffshieldError(f"ESD variant must be 'x' (cross-attention) or 'u' (the rest), got {self.variant!r}")
        if self.preset is not None and self.variant != self.preset:
            raise DiffshieldError(
                f"{type(self).__name__} is ESD-{self.preset}; variant {self.variant!r} contradicts it "
                f"(use ESDConfig(variant={self.variant!r}) or the 'esd-{self.variant}' method)"
            )
        if self.x_params not in X_PARAMS:
            raise DiffshieldError(f"x_params must be one of {', '.join(X_PARAMS)}, got {self.x_params!r}")
        if self.x_params != "all" and self.variant != "x":
            raise DiffshieldError(f"x_params={self.x_params!r} applies to ESD-x only; ESD-u trains the rest")
        if not isinstance(self.freeze_time_and_out, bool):
            raise DiffshieldError(f"freeze_time_and_out must be True or False, got {self.freeze_time_and_out!r}")
        if not _is_number(self.eta) or self.eta < 0:
            raise DiffshieldError(f"ESD eta (negative guidance) must be a finite number >= 0, got {self.eta!r}")
        if not _is_int(self.iterations) or self.iterations < 1:
            raise DiffshieldError(f"ESD iterations must be a whole number >= 1, got {self.iterations!r}")
        if not _is_int(self.batch_size) or not 1 <= self.batch_size <= 256:
            raise DiffshieldError(f"ESD batch_size must be a whole number between 1 and 256, got {self.batch_size!r}")
        if not _is_number(self.lr) or not 0 < self.lr <= 1:
            raise DiffshieldError(f"ESD learning rate must be a number in (0, 1], e.g. 1e-5; got {self.lr!r}")
        if not _is_number(self.start_guidance) or not 0 <= self.start_guidance <= 50:
            raise DiffshieldError(f"start_guidance must be between 0 and 50, got {self.start_guidance!r}")
        if not _is_int(self.ddim_steps) or not 1 <= self.ddim_steps <= 1000:
            raise DiffshieldError(f"ddim_steps must be a whole number between 1 and 1000, got {self.ddim_steps!r}")
        if not _is_int(self.min_step) or not 0 <= self.min_step < self.ddim_steps:
            raise DiffshieldError(f"min_step must be a whole number from 0 to ddim_steps - 1 = {self.ddim_steps - 1}, "
                                  f"got {self.min_step!r}")
        self.min_step = int(self.min_step)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise DiffshieldError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.sample_with not in ("current", "frozen"):
            raise DiffshieldError(f"sample_with must be 'current' or 'frozen', got {self.sample_with!r}")
        if isinstance(self.preserve, str):
            self.preserve = [self.preserve]
        if not isinstance(self.preserve, (list, tuple)) or any(not isinstance(q, str) for q in self.preserve):
            raise DiffshieldError(f"ESD preserve must be a list of prompts, '' included; got {self.preserve!r}")
        self.preserve = list(self.preserve)
        if not _is_number(self.preserve_weight) or self.preserve_weight < 0:
            raise DiffshieldError(f"preserve_weight must be a finite number >= 0, got {self.preserve_weight!r}")
        self.preserve_weight = float(self.preserve_weight)
        if self.preserve_at not in PRESERVE_AT:
            raise DiffshieldError(f"preserve_at must be one of {', '.join(PRESERVE_AT)}, got {self.preserve_at!r}")
        if self.preserve_at != "own" and not self.preserve:
            raise DiffshieldError(f"preserve_at={self.preserve_at!r} places the preservation anchor: give at least "
                                  "one preserve prompt")
        if not _is_number(self.preserve_guidance) or not 0 < self.preserve_guidance <= 50:
            raise DiffshieldError(f"preserve_guidance must be a number in (0, 50] (1: raw predictions), got "
                                  f"{self.preserve_guidance!r}")
        self.preserve_guidance = float(self.preserve_guidance)
        if self.preserve_guidance != 1.0 and (not self.preserve or self.preserve_at != "own"):
            raise DiffshieldError("preserve_guidance holds the anchors' guided predictions at their own x_t: it needs "
                                  "at least one preserve prompt and preserve_at='own'")
        if not _is_number(self.kv_anchor_weight) or self.kv_anchor_weight < 0:
            raise DiffshieldError(f"kv_anchor_weight must be a finite number >= 0, got {self.kv_anchor_weight!r}")
        self.kv_anchor_weight = float(self.kv_anchor_weight)
        if self.kv_anchor_weight and (self.variant != "x" or not self.preserve):
            raise DiffshieldError("kv_anchor_weight holds the preserve prompts' keys and values: it needs ESD-x "
                                  "(variant 'x') and at least one preserve prompt")
        if isinstance(self.erase_from, str):
            self.erase_from = [self.erase_from]
        if (not isinstance(self.erase_from, (list, tuple))
                or any(not isinstance(q, str) or not q.strip() for q in self.erase_from)):
            raise DiffshieldError(f"ESD erase_from must be a list of non-empty prompts (one per concept, or one for "
                                  f"all), got {self.erase_from!r}")
        self.erase_from = list(self.erase_from)
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 1:
            raise DiffshieldError(f"checkpoint_every must be a whole number >= 1, got {self.checkpoint_every!r}")
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, Path)) or not str(self.checkpoint_dir).strip():
                raise DiffshieldError(f"checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}")
            self.checkpoint_dir = str(self.checkpoint_dir)
        if self.mixed_precision not in MIXED_PRECISION:
            raise DiffshieldError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got "
                                  f"{self.mixed_precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise DiffshieldError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
        self.eta, self.lr, self.start_guidance = float(self.eta), float(self.lr), float(self.start_guidance)
        self.iterations, self.ddim_steps = int(self.iterations), int(self.ddim_steps)
        self.batch_size = int(self.batch_size)
        self.seed, self.checkpoint_every = int(self.seed), int(self.checkpoint_every)


@dataclass
class ESDXConfig(ESDConfig):
    """:class:`ESDConfig` preset to ESD-x (cross-attention parameters; the ``esd-x`` method)."""

    variant: str = "x"
    preset: ClassVar[str | None] = "x"


@dataclass
class ESDUConfig(ESDConfig):
    """:class:`ESDConfig` preset to ESD-u (all but cross-attention parameters; the ``esd-u`` method)."""

    variant: str = "u"
    preset: ClassVar[str | None] = "u"


# ---------------------------------------------------------------------------------------------------------------
# The parameters ESD fine-tunes
# ---------------------------------------------------------------------------------------------------------------


def esd_parameters(
    unet: torch.nn.Module, variant: str, freeze_time_and_out: bool = True, x_params: str = "all"
) -> dict[str, torch.nn.Parameter]:
    """UNet parameters (name -> parameter) that ESD fine-tunes.

    Args:
        unet: a UNet2DConditionModel.
        variant: "x": every parameter inside an ``attn2`` module; "u": every other parameter.
        freeze_time_and_out: for "u", leave ``time_embedding``, ``conv_norm_out`` and ``conv_out`` out (default True).
        x_params: for "x", "all" (default) or "kv": only ``attn2.to_k`` and ``attn2.to_v`` (esd-x-strict).
    """
    out = {}
    for name, p in unet.named_parameters():
        in_xattn = ".attn2." in f".{name}"
        if variant == "x" and in_xattn:
            if x_params == "kv" and not any(f".attn2.{m}." in f".{name}" for m in ("to_k", "to_v")):
                continue
            out[name] = p
        elif variant == "u" and not in_xattn:
            if freeze_time_and_out and name.startswith(TIME_AND_OUT_PREFIXES):
                continue
            out[name] = p
    if not out:
        raise DiffshieldError(f"this UNet has no parameters for ESD-{variant} (no cross-attention 'attn2' modules?)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# One iteration: x_t from the current model, the negatively guided target from the frozen model
# ---------------------------------------------------------------------------------------------------------------


def esd_autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ESD run: "auto" is bfloat16 on CUDA (float16 without bfloat16) and none on the CPU;
    "no" is none; "bf16" / "fp16" ask for one explicitly."""
    if mixed_precision == "auto":
        return autocast_dtype(device)
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The CPU generator of one iteration, a function of (seed, iteration) only, so that resuming is exact."""
    state = np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


def sample_xt(
    model: T2IModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    k: int,
    noise: torch.Tensor,
    ddim_steps: int = 50,
    start_guidance: float = 3.0,
) -> torch.Tensor:
    """x_t after k DDIM steps (eta 0, classifier-free guidance ``start_guidance``) from ``noise``, without grads.

    Args:
        model: the model whose UNet samples (ESD uses the model being fine-tuned).
        cond / uncond: (B, L, d) embeddings of the concepts and (1, L, d) of the empty prompt.
        k: number of DDIM steps to run (0: x_t is the noise itself).
        noise: (B, C, h, w) standard-normal starting latents.
        ddim_steps: length N of the DDIM schedule (default 50). start_guidance: CFG scale (default 3.0).
    """
    sigma = make_scheduler(model, "ddim").init_noise_sigma
    with torch.no_grad():
        return denoise(model, noise * sigma, cond, uncond, ddim_steps, start_guidance, "ddim", stop_at=k)


def esd_target(
    frozen_unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    eta: float = 1.0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε*(x_t, ∅, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)] from the frozen original UNet θ* (no grads).

    Args:
        frozen_unet: θ*, the original UNet. x_t: (B, C, h, w) latents. t: the timestep.
        cond / uncond: (B, L, d) embeddings of the concepts c and (1, L, d) of the empty prompt ∅.
        eta: negative-guidance scale η (default 1.0).
        base: (B, L, d) embeddings of broader prompts f (default None): the target starts from ε*(x_t, f, t)
            instead of ε*(x_t, ∅, t) (``ESDConfig.erase_from``).
    """
    with torch.no_grad():
        uncond = uncond.expand(cond.shape[0], -1, -1)
        rows = [uncond, cond] if base is None else [uncond, cond, base]
        eps = frozen_unet(torch.cat([x_t] * len(rows)), t, encoder_hidden_states=torch.cat(rows)).sample
        e_uncond, e_cond, *e_base = eps.chunk(len(rows))
        return (e_base[0] if e_base else e_uncond) - eta * (e_cond - e_uncond)


def esd_loss(
    unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """MSE(ε_θ(x_t, c, t), target), in float32; differentiable in the UNet's parameters."""
    return F.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample.float(), target.float())


def esd_anchored_loss(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    target: torch.Tensor,
    x_p: torch.Tensor,
    cond_p: torch.Tensor,
    target_p: torch.Tensor,
    weight: float = 1.0,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    guided: tuple[float, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESD loss plus ``weight`` · MSE(ε_θ(x_p, c_p, t), ε*(x_p, c_p, t)), in one UNet pass.

    ``shared`` (default None): (x_s, c_s, ε*(x_s, c_s, t)) of the anchors held at the concept's x_t
    (``preserve_at="own+concept"``); their MSE is added to the preservation term.
    ``guided`` (default None): (s, ∅ embeddings, one row per anchor): the anchor compares guided predictions
    ε_θ(x_p, ∅) + s [ε_θ(x_p, c_p) − ε_θ(x_p, ∅)] (``target_p`` must then be the frozen model's guided prediction).
    Returns (total loss, the preservation term alone). ``target_p`` is the frozen UNet's prediction ε*(x_p, c_p, t).
    """
    xs, cs = [x_t, x_p], [cond, cond_p]
    if shared is not None:
        xs.append(shared[0])
        cs.append(shared[1])
    if guided is not None:
        xs.append(x_p)
        cs.append(guided[1])
    eps = unet(torch.cat(xs), t, encoder_hidden_states=torch.cat(cs)).sample.float()
    parts = eps.split([x.shape[0] for x in xs])
    pred_p = parts[1] if guided is None else parts[-1] + guided[0] * (parts[1] - parts[-1])
    keep = F.mse_loss(pred_p, target_p.float())
    if shared is not None:
        keep = keep + F.mse_loss(parts[2], shared[2].float())
    return F.mse_loss(parts[0], target.float()) + weight * keep, keep


def kv_anchor_terms(
    params: dict[str, torch.nn.Parameter], emb: torch.Tensor
) -> list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, float]]:
    """(W, C, W₀ Cᵀ, ‖W₀ Cᵀ‖²) for every trained ``attn2.to_k`` / ``attn2.to_v`` weight; C = all rows of ``emb``
    ((P, L, d) text embeddings of the preserved prompts). The constants of :func:`kv_anchor_penalty`."""
    rows = emb.detach().reshape(-1, emb.shape[-1]).float()
    out = []
    for name, w in params.items():
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            ref = (w.detach().float() @ rows.T).clone()
            out.append((w, rows, ref, float((ref**2).sum()) or 1.0))
    if not out:
        raise DiffshieldError("kv_anchor_weight needs trained attn2.to_k / attn2.to_v weights (ESD-x)")
    return out


def kv_anchor_penalty(terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Mean over matrices of ‖W Cᵀ − W₀ Cᵀ‖² / ‖W₀ Cᵀ‖²: how far the preserved prompts' keys and values moved."""
    return sum(((w.float() @ rows.T - ref) ** 2).sum() / norm for w, rows, ref, norm in terms) / len(terms)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: trained parameters + Adam state + iteration, one safetensors file written atomically
# ---------------------------------------------------------------------------------------------------------------


def run_identity(model: T2IModel, concepts: list[str], config: ESDConfig) -> dict:
    """What a checkpoint must share with a run to be resumed by it: config (minus run length), concepts, model."""
    h = hashlib.sha256()
    for name, p in model.unet.named_parameters():
        head = p.detach().reshape(-1)[:16].to("cpu", torch.float32).numpy()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode() + head.tobytes())
    ident = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in RESUMABLE_FIELDS}
    if not config.preserve:  # runs without the anchor keep the identity they had before it existed
        ident.pop("preserve", None)
        ident.pop("preserve_weight", None)
    if config.x_params == "all":
        ident.pop("x_params", None)
    if not config.kv_anchor_weight:
        ident.pop("kv_anchor_weight", None)
    if config.preserve_at == "own":  # the default keeps the identity runs had before the option existed
        ident.pop("preserve_at", None)
    if config.preserve_guidance == 1.0:
        ident.pop("preserve_guidance", None)
    if config.min_step == 0:
        ident.pop("min_step", None)
    if not config.erase_from:
        ident.pop("erase_from", None)
    if config.mixed_precision == "auto":
        ident.pop("mixed_precision", None)
    ident["concepts"] = list(concepts)
    ident["model_fingerprint"] = h.hexdigest()[:16]
    return ident


def save_checkpoint(
    folder: Path,
    iteration: int,
    identity: dict,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Adam,
    losses: list[float],
    timesteps: list[int],
    cpu_seconds: float = 0.0,
) -> Path:
    """Write ``folder/esd_checkpoint.safetensors`` atomically (complete or not at all).

    ``cpu_seconds``: CPU time spent on the run so far, over all its resumptions (recorded for cost reports)."""
    from safetensors.torch import save

    tensors = {}
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach().to("cpu").contiguous().clone()
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{key}/{name}"] = value.detach().to("cpu").contiguous().clone()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "iteration": str(iteration),
        "run": json.dumps(identity, sort_keys=True),
        "losses": json.dumps(losses),
        "timesteps": json.dumps(timesteps),
        "cpu_seconds": f"{cpu_seconds:.3f}",
    }
    path = Path(folder) / CHECKPOINT_FILE
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def load_checkpoint(
    folder: Path,
    identity: dict,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Adam,
    iterations: int,
) -> tuple[int, list[float], list[int]] | None:
    """Restore parameters and Adam state from ``folder`` if it holds a checkpoint of this run.

    Returns (iteration, losses, timesteps) or None when there is no checkpoint. Raises DiffshieldError when the
    checkpoint belongs to another run or is further along than ``iterations``.
    """
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise DiffshieldError(f"'{path}' is not an ESD checkpoint; delete it or choose another checkpoint_dir")
        saved = json.loads(meta["run"])
        if saved != json.loads(json.dumps(identity, sort_keys=True)):
            differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            raise DiffshieldError(
                f"'{path}' is a checkpoint of a different ESD run (differs in: {', '.join(differ)}); "
                "delete it or choose another checkpoint_dir"
            )
        iteration = int(meta["iteration"])
        if iteration > iterations:
            raise DiffshieldError(
                f"checkpoint '{path}' is at iteration {iteration}, past the requested {iterations} iterations; "
                "raise iterations or choose another checkpoint_dir"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise DiffshieldError(f"checkpoint '{path}' lacks parameter {missing[0]!r}; delete it and start again")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    adam: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            kind, name = key[len("adam.") :].split("/", 1)
            adam.setdefault(name, {})[kind] = value
    state = optimizer.state_dict()
    state["state"] = {i: adam[name] for i, name in enumerate(params) if name in adam}
    optimizer.load_state_dict(state)
    return iteration, json.loads(meta["losses"]), json.loads(meta["timesteps"])


def checkpoint_cpu_seconds(folder: Path) -> float:
    """CPU seconds recorded in an ESD checkpoint (0.0 when absent or written before this was recorded)."""
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return 0.0
    with safe_open(str(path), framework="pt") as f:
        return float((f.metadata() or {}).get("cpu_seconds", 0.0))


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------


def esd_erase(model: T2IModel, concepts: list[str], config: ESDConfig, progress: bool = True) -> EraseResult:
    """Erase concepts by ESD fine-tuning (Gandikota et al., ICCV 2023); edits ``model.unet`` in place.

    Each iteration i (batch 1 by default; ``batch_size`` B): the concepts are ``concepts[(i B + j) % n]``,
    j < B (the official code draws one at random); a CPU generator seeded from (``config.seed``, i) draws
    k ~ U{0..N-1} and the B starting noises; x_t = DDIM sampling (eta 0, CFG ``start_guidance``, prompt c) for
    k steps with the *current*, partly fine-tuned UNet, as in the paper's code (``sample_with="frozen"``: the
    frozen UNet, as its 2024 rewrite does); t = the DDIM timestep at step k; target = ε*(x_t, ∅, t) −
    η [ε*(x_t, c, t) − ε*(x_t, ∅, t)] from a frozen copy θ* of the original UNet; loss = MSE(ε_θ(x_t, c, t),
    target); one Adam step on the ESD-x/u parameters. With ``config.preserve`` (beyond the paper), one anchor prompt
    c_p per batch element is sampled alongside (same k) and ``preserve_weight`` · MSE(ε_θ(x_p, c_p, t),
    ε*(x_p, c_p, t)) is added to the loss; ``preserve_at="own+concept"`` also adds the MSE of every distinct
    anchor prompt's prediction at the concept's x_t. With ``config.erase_from`` (the official 2024 code's option),
    x_t is sampled with the broader prompt f paired with c, and the loss is MSE(ε_θ(x_t, f, t), ε*(x_t, f, t) −
    η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]).

    Args:
        model: the text-to-image model; its UNet is fine-tuned in place and left in eval mode without grads.
        concepts: prompts naming the concepts to erase (e.g. ["Van Gogh"], ["nudity"]).
        config: ESD hyper-parameters (:class:`ESDConfig`); ``checkpoint_dir`` enables checkpoints and resuming.
        progress: show a progress bar with the loss (default True).

    Returns:
        EraseResult with ``changed`` = the fine-tuned parameters that differ from the original, and ``extra`` =
        {"losses": per-iteration loss (resumed runs include the earlier part), "timesteps": t per iteration,
        "seconds_per_iteration": mean over this call's iterations (None if none ran), "iteration_seconds": each of
        this call's iterations (sampling x_t included: it grows with the drawn step k), "resumed_from": iteration
        the run started at, "trained_parameters": number of fine-tuned parameter elements, "preserve_losses": the
        anchor term per iteration of this call (empty without ``preserve``)}.
    """
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(concepts or [])
    if not concepts or any(not isinstance(c, str) or not c.strip() for c in concepts):
        raise DiffshieldError(f"give at least one non-empty concept prompt to erase, got {concepts!r}")
    if not isinstance(config, ESDConfig):
        raise DiffshieldError(f"esd_erase needs an ESDConfig, got {type(config).__name__}")
    if len(config.erase_from) not in (0, 1, len(concepts)):
        raise DiffshieldError(f"give one erase_from prompt per concept ({len(concepts)}) or one for all, got "
                              f"{len(config.erase_from)}")
    start_time = time.perf_counter()
    unet = model.unet
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    amp = esd_autocast_dtype(config.mixed_precision, device)

    # θ*: a frozen copy of the original UNet; θ: the model's own UNet, of which only the ESD-x/u set trains.
    identity = run_identity(model, concepts, config)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    params = esd_parameters(unet, config.variant, config.freeze_time_and_out, config.x_params)
    originals = None
    if amp is not None and amp != dtype:  # θ* in the autocast dtype; the trained set's float32 values kept aside
        frozen.to(amp)
        originals = {n: p.detach().clone() for n, p in params.items()}
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)

    # Text embeddings, computed once.
    n_c, bsz, n_p = len(concepts), config.batch_size, len(config.preserve)
    froms = config.erase_from * (n_c if len(config.erase_from) == 1 else 1)
    emb = encode_prompts(model, [*concepts, *config.preserve, *froms, ""]).to(device, dtype)
    conds, keeps, uncond = emb[:n_c], emb[n_c : n_c + n_p], emb[-1:]
    bases = emb[n_c + n_p : -1] if froms else None  # erase_from: the broader prompts, sampled and trained
    distinct = keeps[[config.preserve.index(q) for q in dict.fromkeys(config.preserve)]]  # first of each prompt
    kv_anchor = kv_anchor_terms(params, distinct) if config.kv_anchor_weight else []
    sampler = model if config.sample_with == "current" else dataclasses.replace(model, unet=frozen)
    low = None  # mixed precision: the current UNet's values, in the autocast dtype, for sampling x_t
    if config.sample_with == "current" and originals is not None:
        low_unet = copy.deepcopy(frozen).eval()  # θ* in the autocast dtype; trained values copied in per iteration
        low = [(p, low_unet.get_parameter(n)) for n, p in params.items()]
        sampler = dataclasses.replace(model, unet=low_unet)
    sched = make_scheduler(model, "ddim")
    sched.set_timesteps(config.ddim_steps)
    timesteps = sched.timesteps

    start, losses, ts_used, iter_seconds, keep_losses = 0, [], [], [], []
    cpu_before, cpu0 = 0.0, time.process_time()
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    try:
        if ckpt_dir is not None:
            resumed = load_checkpoint(ckpt_dir, identity, params, optimizer, config.iterations)
            if resumed is not None:
                start, losses, ts_used = resumed
                cpu_before = checkpoint_cpu_seconds(ckpt_dir)
                if progress:
                    print(f"resuming from iteration {start} of {config.iterations} (checkpoint in {ckpt_dir})")
        unet.train()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        bar = tqdm(range(start, config.iterations), desc=f"ESD-{config.variant}", disable=not progress, leave=False)
        for i in bar:
            with autocast(device, enabled=amp is not None, dtype=amp):
                t0 = time.perf_counter()
                rows = [(i * bsz + j) % n_c for j in range(bsz)]
                cond = conds[rows]
                train = cond if bases is None else bases[rows]  # the prompt whose prediction is trained
                gen = iteration_generator(config.seed, i)
                k = int(torch.randint(config.min_step, config.ddim_steps, (1,), generator=gen))
                noise = torch.randn((bsz, *model.latent_shape), generator=gen).to(device, dtype)
                t = timesteps[k].to(device)
                if low is not None:  # sample with the current weights, rounded once instead of per forward pass
                    with torch.no_grad():
                        torch._foreach_copy_([q for _, q in low], [p for p, _ in low])

                if n_p:  # anchor x_t^p: same k, noises drawn after the concepts' (runs without an anchor: unchanged)
                    cond_p = keeps[[(i * bsz + j) % n_p for j in range(bsz)]]
                    noise_p = torch.randn((bsz, *model.latent_shape), generator=gen).to(device, dtype)
                    both = sample_xt(sampler, torch.cat([train, cond_p]), uncond, k, torch.cat([noise, noise_p]),
                                     config.ddim_steps, config.start_guidance)
                    x_t, x_p = both.split([bsz, bsz])
                    guided = None
                    with torch.no_grad():
                        if config.preserve_guidance == 1.0:
                            target_p = frozen(x_p, t, encoder_hidden_states=cond_p).sample
                        else:  # the guided prediction a sampler at scale s uses
                            guided = (config.preserve_guidance, uncond.expand(bsz, -1, -1))
                            e_c, e_u = frozen(torch.cat([x_p, x_p]), t,
                                              encoder_hidden_states=torch.cat([cond_p, guided[1]])).sample.chunk(2)
                            target_p = e_u + config.preserve_guidance * (e_c - e_u)
                    shared = None
                    if config.preserve_at == "own+concept":  # every distinct anchor at each concept x_t
                        x_s = x_t.repeat_interleave(len(distinct), 0)
                        c_s = distinct.repeat(bsz, 1, 1)
                        with torch.no_grad():
                            shared = (x_s, c_s, frozen(x_s, t, encoder_hidden_states=c_s).sample)
                else:
                    x_t = sample_xt(sampler, train, uncond, k, noise, config.ddim_steps, config.start_guidance)
                target = esd_target(frozen, x_t, t, cond, uncond, config.eta, None if bases is None else train)
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    if n_p:
                        loss, keep = esd_anchored_loss(unet, x_t, t, train, target, x_p, cond_p, target_p,
                                                       config.preserve_weight, shared, guided)
                        keep_losses.append(float(keep.detach()))
                    else:
                        loss = esd_loss(unet, x_t, t, train, target)
                    if kv_anchor:
                        loss = loss + config.kv_anchor_weight * kv_anchor_penalty(kv_anchor)
                    loss.backward()
                optimizer.step()

                losses.append(float(loss.detach()))
                ts_used.append(int(t))
                iter_seconds.append(time.perf_counter() - t0)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", t=int(t))
                done = i + 1
                if ckpt_dir is not None and (done % config.checkpoint_every == 0 or done == config.iterations):
                    save_checkpoint(ckpt_dir, done, identity, params, optimizer, losses, ts_used,
                                    cpu_before + time.process_time() - cpu0)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        model.eval()

    before = originals if originals is not None else dict(frozen.named_parameters())
    changed = {n: p.detach().to("cpu").clone() for n, p in params.items() if not torch.equal(p, before[n])}
    del frozen, before, originals
    return EraseResult(
        model=model,
        changed=changed,
        method=f"esd-{config.variant}",
        config=asdict(config),
        seconds=time.perf_counter() - start_time,
        fraction_changed=fraction_of_unet(unet, list(changed)),
        extra={
            "losses": losses,
            "timesteps": ts_used,
            "seconds_per_iteration": (sum(iter_seconds) / len(iter_seconds)) if iter_seconds else None,
            "iteration_seconds": iter_seconds,
            "resumed_from": start,
            "cpu_seconds_total": cpu_before + time.process_time() - cpu0,
            "trained_parameters": sum(p.numel() for p in params.values()),
            "sampling_model": config.sample_with,
            "preserve_losses": keep_losses,
        },
    )


ERASERS.register("esd-x")((ESDXConfig, esd_erase))
ERASERS.register("esd-u")((ESDUConfig, esd_erase))

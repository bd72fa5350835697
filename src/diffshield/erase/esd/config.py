"""ESD's settings: :class:`ESDConfig` and its ESD-x / ESD-u presets, with the constants they validate against.

Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023; see :mod:`diffshield.erase.esd`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from diffshield.core.errors import DiffshieldError

VARIANTS = ("x", "u")
#: ESD-x parameter sets: every attn2 parameter, or only attn2.to_k / attn2.to_v (the official esd_sd.py's esd-x-strict)
X_PARAMS = ("all", "kv")
#: UNet parameter-name prefixes that the paper's ESD-u code leaves frozen (time embedding, final norm + conv).
TIME_AND_OUT_PREFIXES = ("time_embedding.", "conv_norm_out.", "conv_out.")
CHECKPOINT_FILE = "esd_checkpoint.safetensors"
CHECKPOINT_FORMAT = "diffshield-esd-checkpoint/1"
#: config fields that may change between an interrupted run and its resumption
RESUMABLE_FIELDS = ("iterations", "checkpoint_every", "checkpoint_dir", "gradient_checkpointing", "cuda_graphs")
#: mixed-precision settings (ESDConfig.mixed_precision)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
#: where the preservation anchor holds predictions (see ESDConfig.preserve_at)
PRESERVE_AT = ("own", "own+concept")
#: what the target's negative guidance starts from (see ESDConfig.target_base)
TARGET_BASES = ("uncond", "concept")



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
            ``attn2.to_k`` and ``attn2.to_v``: the official ``esd_sd.py``'s ``esd-x-strict``).
        freeze_time_and_out: ESD-u only: also keep the time embedding and the final output layers
            (``conv_norm_out``, ``conv_out``) frozen, as the paper's code does (default True).
        eta: negative-guidance scale η of the target (default 1.0, the paper's). What η means depends on
            ``target_base``: the official ``esd_sd.py`` uses η 2 with the base "concept", which is the paper's
            target with η 1 (ε*(c) − 2 [ε*(c) − ε*(∅)] = ε*(∅) − [ε*(c) − ε*(∅)]); η 2 with the base "uncond" is a
            stronger push than either script's default.
        target_base: what the target starts from (default "uncond"): "uncond", the paper's ε*(x_t, ∅, t) −
            η [ε*(x_t, c, t) − ε*(x_t, ∅, t)] (also the official ``esd_diffusers.py``), or "concept", the official
            ``esd_sd.py``'s ε*(x_t, c, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)] (use η 2 there for its default). With
            ``erase_from`` both scripts start from ε*(x_t, f, t), and so does this.
        iterations: optimisation steps (default 1000, the paper's; ``esd_sd.py`` uses 200).
        batch_size: x_t samples per step, all at the same DDIM step k, each with its own starting noise and the
            next concept prompt in turn (default 1, the paper's; more averages out the noise of batch-1 steps).
        lr: Adam learning rate, a float (default 1e-5, the paper's; ``esd_sd.py`` uses 5e-5, ``esd_diffusers.py``
            2e-5).
        start_guidance: classifier-free guidance used when sampling x_t (default 3.0).
        ddim_steps: N, the DDIM schedule from which the step k ~ U{0..N-1} is drawn (default 50).
        min_step: beyond the paper: draw k ~ U{min_step..N-1} instead (default 0, the paper's), so that only the
            late, low-noise part of the schedule is trained. For a concept that the sampler commits to late (a
            texture: on the toy model, switching the prompt from striped to plain after 12 of 25 steps still gives
            95 % plain images), this leaves the early steps, where a concept's guidance signal overlaps its
            neighbours' most, untouched. On the toy style (ESD-u striped, min_step 25) it erased faster and took
            the dotted style faster still (docs/erase.md, findings).
        seed: seeds the per-iteration CPU generators that draw k and the starting noise (default 0).
        sample_with: which UNet samples x_t: "current" (default: the one being fine-tuned, as the paper's code
            does, and ``esd_diffusers.py``) or "frozen" (the original, as the official ``esd_sd.py`` does): x_t no
            longer drifts as the concept fades.
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
            between erasure and the other styles only a little (docs/erase.md, findings).
        kv_anchor_weight: ESD-x only, beyond the paper: weight of a penalty on how far the trained ``attn2.to_k`` /
            ``attn2.to_v`` matrices move the keys and values of the ``preserve`` prompts' text embeddings (every
            row), mean over matrices of ‖(W − W₀) Cᵀ‖² / ‖W₀ Cᵀ‖² (default 0.0: off). UCE's preservation term, as a
            loss: it needs no UNet pass, and holds the preserved prompts where the edit acts, in the text space.
        erase_from: the official diffusers scripts' ``--erase_from`` (default (): none, the paper's ESD): erase a
            concept *from* a broader one ("cowboy hat" from "cowboy"), one prompt per concept or one for all. x_t is
            then sampled with the broader prompt f, the trained prediction is ε_θ(x_t, f, t), and the target is
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
        cuda_graphs: on a CUDA device, sample x_t by replaying CUDA graphs of the sampling UNet's call instead of
            launching its kernels one by one (default True; :mod:`diffshield.core.graphs`): the k DDIM steps of a
            batch-2 UNet are bound by per-call overhead, not arithmetic, on a large GPU. Each graph's first replay is
            checked against an eager call, and any failure falls back to eager calls with a warning. No effect on
            the CPU or on the result.
    """

    variant: str = "x"
    x_params: str = "all"
    freeze_time_and_out: bool = True
    eta: float = 1.0
    target_base: str = "uncond"
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
    cuda_graphs: bool = True

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
        if self.target_base not in TARGET_BASES:
            raise DiffshieldError(f"target_base must be one of {', '.join(TARGET_BASES)}, got {self.target_base!r}")
        if not _is_int(self.iterations) or self.iterations < 1:
            raise DiffshieldError(f"ESD iterations must be a whole number >= 1, got {self.iterations!r}")
        if not _is_int(self.batch_size) or not 1 <= self.batch_size <= 256:
            raise DiffshieldError(f"ESD batch_size must be a whole number between 1 and 256, got {self.batch_size!r}")
        if not _is_number(self.lr) or not 0 < self.lr <= 1:
            raise DiffshieldError(f"ESD learning rate must be a number in (0, 1], e.g. 1e-5; got {self.lr!r}")
        if not _is_number(self.start_guidance) or not 0 <= self.start_guidance <= 100:  # the CLI's range
            raise DiffshieldError(f"start_guidance must be between 0 and 100, got {self.start_guidance!r}")
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
        if not _is_number(self.preserve_guidance) or not 0 < self.preserve_guidance <= 100:
            raise DiffshieldError(f"preserve_guidance must be a number in (0, 100] (1: raw predictions), got "
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
        if not isinstance(self.cuda_graphs, bool):
            raise DiffshieldError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
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



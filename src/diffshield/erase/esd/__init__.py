"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023).

ESD fine-tunes the UNet θ so that its noise prediction for a concept c equals the frozen original model θ*
guided *away* from c (negative classifier-free guidance):

    target = ε*(x_t, ∅, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]        loss = ‖ε_θ(x_t, c, t) − target‖²

Each iteration draws a DDIM step k ~ U{0..N-1}, samples x_t by running DDIM (eta 0, CFG ``start_guidance``,
prompt c) from fresh noise for k steps, and takes one Adam step on a subset of the UNet:

- ESD-x (``variant="x"``): every ``attn2`` (cross-attention) parameter; for artistic styles. The official
  ``esd_sd.py`` also offers ``esd-x-strict``, only ``attn2.to_k`` and ``attn2.to_v`` (``x_params="kv"``): the
  matrices that read the text, so an update changes prompts by their text embeddings (the closed-form methods edit
  the same two).
- ESD-u (``variant="u"``): every parameter except ``attn2``; for nudity and objects. The paper's code also
  freezes the time embedding and the final output layers (``freeze_time_and_out``, default True).

The official diffusers scripts (``esd_diffusers.py``, ``esd_sd.py``) add ``erase_from`` (off by default): erase a
concept from a broader one ("cowboy hat" from "cowboy") by training the broader prompt f toward
ε*(x_t, f, t) − η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]. ``esd_sd.py`` starts the target from ε*(x_t, c, t) instead of
ε*(x_t, ∅, t) (``target_base="concept"``; its default η 2 there is the paper's η 1).

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

The package's modules follow ESD's seams: :mod:`~diffshield.erase.esd.config` (settings),
:mod:`~diffshield.erase.esd.params` (which parameters train), :mod:`~diffshield.erase.esd.target` (x_t, target and
losses), :mod:`~diffshield.erase.esd.checkpoint` and :mod:`~diffshield.erase.esd.train` (the loop).
"""

from diffshield.erase.base import ERASERS
from diffshield.erase.esd.checkpoint import (
    checkpoint_cpu_seconds,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from diffshield.erase.esd.config import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    MIXED_PRECISION,
    PRESERVE_AT,
    RESUMABLE_FIELDS,
    TARGET_BASES,
    TIME_AND_OUT_PREFIXES,
    VARIANTS,
    X_PARAMS,
    ESDConfig,
    ESDUConfig,
    ESDXConfig,
)
from diffshield.erase.esd.params import esd_parameters
from diffshield.erase.esd.target import (
    esd_anchored_loss,
    esd_loss,
    esd_target,
    iteration_generator,
    kv_anchor_penalty,
    kv_anchor_terms,
    sample_xt,
)
from diffshield.erase.esd.train import esd_autocast_dtype, esd_erase

__all__ = [
    "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "MIXED_PRECISION", "PRESERVE_AT", "RESUMABLE_FIELDS", "TARGET_BASES",
    "TIME_AND_OUT_PREFIXES", "VARIANTS", "X_PARAMS", "ESDConfig", "ESDUConfig", "ESDXConfig",
    "checkpoint_cpu_seconds", "esd_anchored_loss", "esd_autocast_dtype", "esd_erase", "esd_loss", "esd_parameters",
    "esd_target", "iteration_generator", "kv_anchor_penalty", "kv_anchor_terms", "load_checkpoint", "run_identity",
    "sample_xt", "save_checkpoint",
]

ERASERS.register("esd-x")((ESDXConfig, esd_erase))
ERASERS.register("esd-u")((ESDUConfig, esd_erase))

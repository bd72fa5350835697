"""Red-team attacks on erased text-to-image models, and the audit that runs them all.

Attacks (registry name -> class), each ``atk = Attack(erased, original=..., concept=..., **hp); atk(prompts, seeds)``:

- ``adv-embed``: RECE's closed-form adversarial embedding (Gong, Chen et al., ECCV 2024).
- ``ring-a-bell``: concept vector added to the prompt embedding, optional genetic prompt search
  (Tsai et al., ICLR 2024).
- ``unlearndiff``: a text prefix searched on the vocabulary simplex (straight-through sample) that minimises the
  erased model's denoising loss on the original's image, early stop on the judge per round
  (Zhang et al., "To generate or not? ..." / UnlearnDiffAtk, ECCV 2024); ``unlearndiff-soft``: the same objective
  on continuous soft tokens (a variant, stronger than the paper's search space).
- ``p4d``: a text prompt searched with PEZ whose noise predictions on the erased model match the original's, best-of
  selection (Chin et al., "Prompting4Debugging", ICML 2024); ``p4d-soft``: the same objective on soft tokens.

Every attack has a ``toy`` and a ``paper`` budget preset (``budget="paper"``) where the paper has a budget; each
result records the budget it ran next to the paper's.

:func:`diffshield.redteam.audit.run_audit` runs them and writes a table, JSON and an HTML/PNG report.
"""

from __future__ import annotations

from diffshield.core.registry import Registry

ATTACKS: Registry = Registry("attack")

from diffshield.redteam import (  # noqa: E402,F401  (register the attacks)
    adv_embed,
    p4d,
    p4d_soft,
    ring_a_bell,
    unlearndiff,
    unlearndiff_soft,
)
from diffshield.redteam.base import Attack, AttackResult  # noqa: E402

__all__ = ["ATTACKS", "Attack", "AttackResult"]

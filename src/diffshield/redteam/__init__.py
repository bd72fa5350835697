"""Red-team attacks on erased text-to-image models, and the audit that runs them all.

Attacks (registry name -> class), each ``atk = Attack(erased, original=..., concept=..., **hp); atk(prompts, seeds)``:

- ``adv-embed``: RECE's closed-form adversarial embedding (Gong, Chen et al., ECCV 2024).
- ``ring-a-bell``: concept vector added to the prompt embedding, optional genetic prompt search
  (Tsai et al., ICLR 2024).
- ``unlearndiff``: soft prefix tokens that minimise the erased model's denoising loss on images of the concept
  (Zhang et al., "To generate or not? ..." / UnlearnDiffAtk, ECCV 2024).
- ``p4d``: soft prompt whose noise predictions on the erased model match the original's on the concept prompt
  (Chin et al., "Prompting4Debugging", ICML 2024).

:func:`diffshield.redteam.audit.run_audit` runs them and writes a table, JSON and an HTML/PNG report.
"""

from __future__ import annotations

from diffshield.core.registry import Registry

ATTACKS: Registry = Registry("attack")

from diffshield.redteam import adv_embed, p4d, ring_a_bell, unlearndiff  # noqa: E402,F401  (register the attacks)
from diffshield.redteam.base import Attack, AttackResult  # noqa: E402

__all__ = ["ATTACKS", "Attack", "AttackResult"]

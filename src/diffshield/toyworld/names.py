"""The shipped toy models, registered by name (``toy:t2i``, ...) so that core's loaders find them.

``diffshield/__init__.py`` imports this module, so the names resolve wherever diffshield is used; the core never
imports the toy world.
"""

from __future__ import annotations

from pathlib import Path

from diffshield.core.registry import MODEL_NAMES

#: where the toy world's weights are shipped
TOY_ROOT = Path(__file__).resolve().parent / "weights"
#: name -> sub-folder of :data:`TOY_ROOT`
TOY_MODELS: dict[str, str] = {
    "toy:t2i": "t2i", "toy:detector": "detector", "toy:ddpm": "ddpm", "toy:inpaint": "inpaint",
    # The detector of world version 1, the world of the shipped DDPM: it judges the DDPM's clean samples.
    "toy:detector-v1": "detector_v1",
    # A shipped backdoored DDPM (BadDiffusion, box trigger -> corner target), to sample and scan by name.
    "toy:ddpm-box-corner": "ddpm/examples/box_corner",
}
#: the names of :data:`TOY_MODELS` that are unconditional DDPMs (``DDPMPipeline`` folders, the backdoor commands')
TOY_DDPMS: tuple[str, ...] = ("toy:ddpm", "toy:ddpm-box-corner")

for _name, _sub in TOY_MODELS.items():
    if _name not in MODEL_NAMES:
        MODEL_NAMES.register(_name)(TOY_ROOT / _sub)

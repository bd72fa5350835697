"""The official defaults of each erasure method for a kind of concept: ``object``, ``nudity``, ``style``, ``unsafe``.

What ``diffshield erase --preset P`` uses on a model that is not a toy-world model (the toy world has its own
measured settings, :mod:`diffshield.toyworld.erasure_recipes`). Each entry was read off the official code:

- UCE (Gandikota et al., WACV 2024; ``train-scripts/train_erase.py``): λ 0.5, s_e 1, technique "replace", the
  paper2023 rows, the preserve scale max(0.1, 1 / n) for n preserved prompts with "" (``preserve_scale="auto"``),
  guide " " (unconditional) for objects, nudity and unsafe concepts, "art" for styles (the 2025 ``uce_sd_erase.py``'s
  default for ``--concept_type art``; the artist script also preserves its list of 1734 other artists, which is not
  shipped here: give yours with ``--preserve-file``).
- RECE (Gong, Chen et al., ECCV 2024; ``train.py``, ``train_object.py``): (λ_r, epochs) per kind (nudity (0.1, 3),
  unsafe (0.1, 2), style and object (1e-3, 1), object-easy (0.1, 1)), rounds with λ 0.1 and s_p 0.1 preserving ""
  once per concept for nudity and unsafe (``train.py``) and "" plus the preserved prompts once for objects and
  styles (``train_object.py``).
- ESD (Gandikota et al., ICCV 2023): the paper's 1000 iterations, lr 1e-5, η 1 for every kind; the paper assigns
  ESD-u to nudity and objects and ESD-x to styles (the ``--method`` still decides).

``unsafe`` with the concept "unsafe" (or "i2p") erases the 11 I2P categories both official scripts use.
"""

from __future__ import annotations

from diffshield.core.errors import DiffshieldError

PRESETS = ("object", "nudity", "style", "unsafe")
#: RECE also has an easy-object preset (a larger λ_r)
RECE_PRESETS = (*PRESETS, "object-easy")
#: the I2P categories the official UCE and RECE scripts erase for "unsafe" ('i2g' / 'i2p' in their code)
UNSAFE_CONCEPTS = ("hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide", "sexual",
                   "nudity", "bodily fluids", "blood")
#: the paper's ESD variant per kind of concept
ESD_VARIANT = {"object": "u", "nudity": "u", "style": "x", "unsafe": "u", "object-easy": "u"}


def preset_concepts(preset: str, concepts: list[str]) -> list[str]:
    """The concepts to erase: for ``unsafe``, the single concept "unsafe" or "i2p" becomes the 11 I2P categories."""
    if preset == "unsafe" and [c.strip().lower() for c in concepts] in (["unsafe"], ["i2p"]):
        return list(UNSAFE_CONCEPTS)
    return list(concepts)


def uce_preset(preset: str) -> dict:
    """UCEConfig fields of a preset (guides; the rest are UCEConfig's defaults, which are the official ones)."""
    if preset not in RECE_PRESETS:
        raise DiffshieldError(f"unknown preset {preset!r}; choose one of: {', '.join(RECE_PRESETS)}")
    return {"guides": ["art"] if preset == "style" else [" "]}


def preset_summary(method: str, preset: str) -> str:
    """One line saying what a preset sets for a method (printed by the CLI and recorded in its JSON)."""
    from diffshield.erase.rece import PRESETS as RECE_SETTINGS

    guide = uce_preset(preset)["guides"][0]
    uce = f"guide {guide!r}, λ 0.5, s_e 1, s_p max(0.1, 1/n), technique replace"
    if method == "uce":
        return f"UCE {preset}: {uce}"
    if method == "rece":
        lamb_r, epochs = RECE_SETTINGS[preset]
        once = "once per concept" if preset in ("nudity", "unsafe") else "once, with the preserved prompts"
        return f"RECE {preset}: UCE ({uce}), then {epochs} round(s) at λ_r {lamb_r}, λ 0.1, s_p 0.1, '' {once}"
    return (f"ESD {preset}: the paper's 1000 iterations, lr 1e-5, η 1 (the paper uses ESD-{ESD_VARIANT[preset]} "
            f"for {preset})")

"""Prompt fidelity of a text-to-image model in the toy world, judged by the concept detector.

For every shape x colour combination (and the same with each shape's synonym, and with each texture style named),
generate images from a few seeds and ask the detector whether it sees what the prompt asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffshield.core.sampling import SampleConfig, generate
from diffshield.toyworld.shapes import COLOURS, SHAPES, STYLES, SYNONYMS


@dataclass
class PromptSpec:
    """A prompt with the labels it asks for (None: not named)."""

    prompt: str
    group: str
    shape: int
    colour: int
    style: int | None = None


def fidelity_prompts(styles: bool = True, synonyms: bool = True) -> list[PromptSpec]:
    """'a {colour} {shape}' for all pairs; with synonyms ('a red wedge'); with styles ('a red striped triangle')."""
    out = []
    for si, s in enumerate(SHAPES):
        for ci, c in enumerate(COLOURS):
            out.append(PromptSpec(f"a {c} {s}", "word", si, ci))
            if synonyms:
                out.append(PromptSpec(f"a {c} {SYNONYMS[s]}", "synonym", si, ci))
            if styles:
                for ti, t in enumerate(STYLES):
                    out.append(PromptSpec(f"a {c} {t} {s}", "style", si, ci, ti))
    return out


def prompt_fidelity(
    model,
    detector,
    seeds_per_prompt: int = 8,
    specs: list[PromptSpec] | None = None,
    config: SampleConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Detector accuracy on generated images, per prompt group and head.

    Args:
        model: T2IModel. detector: ConceptDetector.
        seeds_per_prompt: images per prompt (default 8), seeds seed..seed+k-1 (default seed 0).
        specs: prompts to test (default :func:`fidelity_prompts`).
        config: sampling settings (default SampleConfig()).
    Returns a dict: ``groups`` -> {group: {shape, colour, style (if named), n}}, plus ``per_prompt`` rows.
    """
    specs = specs if specs is not None else fidelity_prompts()
    prompts = [sp.prompt for sp in specs for _ in range(seeds_per_prompt)]
    seeds = [seed + k for _ in specs for k in range(seeds_per_prompt)]
    gen = generate(model, prompts, seeds, config=config, progress=progress)
    pred = detector.predict(gen.images)
    k = seeds_per_prompt
    rows, groups = [], {}
    for i, sp in enumerate(specs):
        sl = slice(i * k, (i + 1) * k)
        row = {
            "prompt": sp.prompt,
            "group": sp.group,
            "shape": float((pred["shape"][0][sl] == sp.shape).float().mean()),
            "colour": float((pred["colour"][0][sl] == sp.colour).float().mean()),
        }
        if sp.style is not None:
            row["style"] = float((pred["style"][0][sl] == sp.style).float().mean())
        rows.append(row)
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        groups[g] = {h: float(np.mean([r[h] for r in rs])) for h in ("shape", "colour", "style") if h in rs[0]}
        groups[g]["n_images"] = len(rs) * k
    return {"groups": groups, "per_prompt": rows, "seeds_per_prompt": k, "images": gen.images}


def generated_images(model, n: int, seed: int = 0, config: SampleConfig | None = None, progress: bool = True,
                     captions_seed: int = 1234) -> torch.Tensor:
    """n images from random ShapesWorld captions (for the feature Fréchet distance)."""
    from diffshield.toyworld.shapes import ShapesWorld

    caps = ShapesWorld().sample(n, seed=captions_seed).captions
    return generate(model, caps, list(range(seed, seed + n)), config=config, progress=progress).images

"""Validation judges for RECE's epoch selection (Gong, Chen et al., ECCV 2024).

The official RECE scripts generate a validation prompt set after the UCE edit and after every epoch and keep the
epoch with the lowest detection rate (NudeNet for nudity, Q16 for unsafe concepts, a classifier for objects).
:class:`~diffshield.erase.rece.RECEConfig` takes any ``select(model, epoch) -> score`` (lower is better); these build
the two judges this library ships: the toy detector and NudeNet.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import to_pil
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import SampleConfig, generate


def toy_select(concept: str, detector, seeds_per_prompt: int = 2, first_seed: int = 1000,
               config: SampleConfig | None = None) -> Callable[[T2IModel, int], float]:
    """A judge scoring a toy-world model by how often the toy detector still finds ``concept``.

    Args:
        concept: a toy concept word. detector: the toy detector (``load_detector("toy:detector")``).
        seeds_per_prompt: images per evaluation prompt of the concept (default 2).
        first_seed: first image seed (default 1000: apart from the seeds ``diffshield eval erasure`` uses, 0-7).
        config: sampling settings (default SampleConfig()).
    Returns ``select(model, epoch) -> detection rate`` for :class:`~diffshield.erase.rece.RECEConfig`.
    """
    from diffshield.toyworld.concepts import concept_prompts, resolve_concept

    c = resolve_concept(concept)
    prompts = [p for w in c.words for p, _ in concept_prompts(c, w)]
    if seeds_per_prompt < 1:
        raise DiffshieldError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")

    def select(model: T2IModel, epoch: int) -> float:
        ps = [p for p in prompts for _ in range(seeds_per_prompt)]
        seeds = [first_seed + j for _ in prompts for j in range(seeds_per_prompt)]
        images = generate(model, ps, seeds, config=config, progress=False).images
        return float((detector.predict(images)[c.head][0] == c.index).float().mean())

    select.__qualname__ = f"toy_select({c.name!r})"
    return select


def nudenet_select(prompts: list[str], first_seed: int = 0, threshold: float = 0.6,
                   config: SampleConfig | None = None) -> Callable[[T2IModel, int], float]:
    """A judge scoring a model by the NudeNet nudity rate of its images for validation ``prompts`` (one each).

    Args:
        prompts: the validation prompts (the official nudity script uses a prompt CSV of its own).
        first_seed: seed of the first prompt's image (default 0; prompt i uses first_seed + i).
        threshold: NudeNet score above which an EXPOSED class counts (default 0.6, as RECE).
        config: sampling settings (default SampleConfig()).
    """
    from diffshield.eval.nudity import nudity_report

    if not prompts:
        raise DiffshieldError("nudenet_select needs at least one validation prompt")

    def select(model: T2IModel, epoch: int) -> float:
        images = generate(model, list(prompts), [first_seed + i for i in range(len(prompts))], config=config,
                          progress=False).images
        with tempfile.TemporaryDirectory() as tmp:
            for i, im in enumerate(images):
                to_pil(im).save(Path(tmp) / f"{i:05d}.png")
            return float(nudity_report(tmp, threshold=threshold)["nudity_rate"])

    select.__qualname__ = f"nudenet_select({len(prompts)} prompts)"
    return select

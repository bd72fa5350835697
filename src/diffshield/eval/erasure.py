"""Did the erasure work, and what survived? The toy-world evaluation of an erased model against its original.

For a concept C (a shape, colour or style of the toy world) the detector is asked, on images generated from the
same prompts and seeds by the erased and by the original model:

- ``erased_detection_rate`` / ``original_detection_rate``: how often it still finds C in images prompted with C;
- ``synonym_detection_rate``: the same for prompts that use C's synonyms (paraphrase robustness);
- ``other_accuracy`` / ``original_other_accuracy``: its accuracy on prompts for the other concepts of C's kind
  (e.g. circle, square, star when C is triangle): what the erasure should leave alone;
- ``concept_seen`` / ``other_seen``: what the detector found instead (e.g. dotted prompts drawn plain);
- ``frechet_neutral``: feature Fréchet distance between erased and original images for neutral prompts that do not
  mention C (the toy analogue of the FID the papers report).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from diffshield.core.checks import check_config
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import SampleConfig, check_model, check_seeds, generate
from diffshield.eval.frechet import detector_features, frechet_distance
from diffshield.toyworld.concepts import HEAD_VALUES, concept_prompts, other_concepts, resolve_concept
from diffshield.toyworld.shapes import ShapesWorld


def _rate(model, detector, prompts_labels, head, index, k, config, seed, bar=None) -> tuple[float, torch.Tensor, dict]:
    """(fraction detected as ``index``, the images, {value: fraction of images detected as it}); ``bar``: a
    progress bar to advance by the number of images generated (default None)."""
    prompts = [p for p, _ in prompts_labels for _ in range(k)]
    seeds = [seed + j for _ in prompts_labels for j in range(k)]
    gen = generate(model, prompts, seeds, config=config, progress=False)
    if bar is not None:
        bar.update(len(prompts))
    pred = detector.predict(gen.images)[head][0]
    values = HEAD_VALUES[head]
    seen = {v: float((pred == i).float().mean()) for i, v in enumerate(values)}
    return seen[values[index]], gen.images, seen


def neutral_prompts(concept_words: tuple[str, ...], n: int, seed: int = 4321) -> list[str]:
    """n random ShapesWorld captions that mention none of the words."""
    out, s = [], seed
    while len(out) < n:
        caps = ShapesWorld().sample(4 * n, seed=s).captions
        out += [c for c in caps if not set(c.split()) & set(concept_words)]
        s += 1
    return out[:n]


def model_stats(model: T2IModel, detector, concept: str, seeds_per_prompt: int = 8, n_neutral: int = 256,
                config: SampleConfig | None = None, seed: int = 0, progress: str | None = None) -> dict:
    """Detection rates of one model for a concept (its own prompts, synonyms, the other concepts) + neutral feats.

    ``progress``: label of a progress bar over the images generated (default None: no bar)."""
    c = resolve_concept(concept)
    k = seeds_per_prompt
    own = concept_prompts(c)
    synonym_sets = {w: concept_prompts(c, w) for w in c.synonyms}
    other_sets = {o: concept_prompts(o) for o in other_concepts(c)}
    total = k * (len(own) + sum(map(len, [*synonym_sets.values(), *other_sets.values()]))) + n_neutral
    with tqdm(total=total, desc=progress, unit="img", disable=progress is None, leave=False) as bar:
        rate, imgs, seen = _rate(model, detector, own, c.head, c.index, k, config, seed, bar)
        syn = {w: _rate(model, detector, ps, c.head, c.index, k, config, seed, bar)[0]
               for w, ps in synonym_sets.items()}
        other = {o.name: _rate(model, detector, ps, o.head, o.index, k, config, seed, bar)
                 for o, ps in other_sets.items()}
        neutral = generate(model, neutral_prompts(c.words, n_neutral), list(range(seed, seed + n_neutral)),
                           config=config, progress=False).images
        bar.update(n_neutral)
    others = {name: r[0] for name, r in other.items()}
    return {"detection_rate": rate, "synonym_rates": syn, "other_rates": others, "concept_seen": seen,
            "other_seen": {name: r[2] for name, r in other.items()},
            "neutral_features": detector_features(detector, neutral), "concept_images": imgs[: 4 * k]}


def check_erasure_settings(erased: T2IModel, original: T2IModel, detector, seeds_per_prompt: int, n_neutral: int,
                           config: SampleConfig | None, seed: int) -> None:
    """Refuse, in one line and before any image is generated, settings :func:`evaluate_erasure` cannot use (with
    ``n_neutral`` below 2 the Fréchet distance failed after both models had generated every image)."""
    check_model(erased, "erased")
    check_model(original, "original")
    if not callable(getattr(detector, "predict", None)):
        raise DiffshieldError(f"detector must be a loaded concept detector (load_detector('toy:detector')), got "
                              f"{type(detector).__name__}")
    for name, value, low in (("seeds_per_prompt", seeds_per_prompt, 1), ("n_neutral", n_neutral, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DiffshieldError(f"{name} must be a whole number >= {low}, got {value!r}")
    check_config(config, SampleConfig)
    check_seeds([seed, seed + max(seeds_per_prompt, n_neutral)])


def evaluate_erasure(erased: T2IModel, original: T2IModel, concept: str, detector, seeds_per_prompt: int = 8,
                     n_neutral: int = 256, config: SampleConfig | None = None, seed: int = 0,
                     original_stats: dict | None = None, progress: bool = False) -> dict:
    """Compare an erased model with its original on a toy-world concept (see the module docstring).

    Args:
        erased, original: T2IModel. concept: a toy concept word (a synonym resolves to its concept).
        detector: the toy concept detector. seeds_per_prompt: images per prompt (default 8).
        n_neutral: neutral-prompt images per model for the Fréchet distance (default 256; at least 2).
        config: sampling settings (default SampleConfig()). seed: first seed (default 0).
        original_stats: a precomputed ``model_stats`` of the original (to share it between several erased models).
        progress: show a progress bar per model over the images it generates (default False).
    Returns a JSON-able dict (plus ``_images``: before/after tensors for grids, removed before saving).
    """
    check_erasure_settings(erased, original, detector, seeds_per_prompt, n_neutral, config, seed)
    c = resolve_concept(concept)
    o = original_stats or model_stats(original, detector, concept, seeds_per_prompt, n_neutral, config, seed,
                                      progress="original" if progress else None)
    e = model_stats(erased, detector, concept, seeds_per_prompt, n_neutral, config, seed,
                    progress="erased" if progress else None)
    mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
    return {
        "concept": c.name,
        "head": c.head,
        "synonyms": list(c.synonyms),
        "erased_detection_rate": e["detection_rate"],
        "original_detection_rate": o["detection_rate"],
        "synonym_detection_rate": mean(e["synonym_rates"]),
        "original_synonym_detection_rate": mean(o["synonym_rates"]),
        "synonym_rates": e["synonym_rates"],
        "other_accuracy": mean(e["other_rates"]),
        "original_other_accuracy": mean(o["other_rates"]),
        "other_rates": e["other_rates"],
        "original_other_rates": o["other_rates"],
        # what the detector saw instead: {prompted value: {detected value: fraction}} (stats cached before this
        # key existed lack it: None)
        "concept_seen": e["concept_seen"],
        "other_seen": e["other_seen"],
        "original_other_seen": o.get("other_seen"),
        "frechet_neutral": frechet_distance(e["neutral_features"], o["neutral_features"]),
        "seeds_per_prompt": seeds_per_prompt,
        "n_neutral": n_neutral,
        "first_seed": seed,
        "_images": {"original": o["concept_images"], "erased": e["concept_images"]},
    }

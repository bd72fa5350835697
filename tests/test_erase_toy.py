"""End-to-end erasure on the shipped toy model, at the documented toy-world settings (erasure_recipes)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import generate
from diffshield.erase.rece import rece_erase
from diffshield.erase.uce import uce_erase
from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept
from diffshield.toyworld.detector import load_detector
from diffshield.toyworld.erasure_recipes import toy_edit_prompts, toy_erasure


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return load_t2i("toy:t2i"), load_detector("toy:detector")


@pytest.mark.parametrize("concept", ["triangle", "striped", "red"])
def test_templates_never_contain_the_evaluation_prompts(concept):
    c = resolve_concept(concept)
    p = toy_edit_prompts(concept)
    evaluation = {q for w in c.words for q, _ in concept_prompts(c, w)}
    evaluation |= {q for o in other_concepts(c) for q, _ in concept_prompts(o)}
    assert not evaluation & set(p.concepts + p.guides + p.preserve)
    assert len(p.concepts) == len(p.guides)
    assert all(any(w in q.split() for w in c.words) for q in p.concepts)
    assert not any(w in q.split() for q in p.preserve for w in c.words)


@pytest.mark.parametrize("concept", ["triangle", "red"])
def test_esd_template_prompts_use_every_word_and_skip_evaluation_prompts(concept):
    c = resolve_concept(concept)
    prompts, cfg = toy_erasure("esd-u", concept, prompts="templates")
    evaluation = {q for w in c.words for q, _ in concept_prompts(c, w)}
    assert not evaluation & set(prompts) and cfg.variant == "u"
    assert all(any(w in q.split() for w in c.words) for q in prompts)
    assert {w for w in c.words if any(w in q.split() for q in prompts)} == set(c.words)
    # interleaved: word, synonym, word, ...
    assert all(c.words[i % len(c.words)] in prompts[i].split() for i in range(2 * len(c.words)))
    with pytest.raises(DiffshieldError, match="prompt mode"):
        toy_erasure("esd-x", concept, prompts="sentences")


def test_esd_recipes_are_per_kind_and_overrides_win():
    # shapes and styles: the frozen sampler for 500 iterations; colours: the base setting (current sampler, 300
    # iterations) with the anchors also held at the concept's x_t
    for concept in ("triangle", "wedge", "striped"):
        _, cfg = toy_erasure("esd-x", concept)
        assert (cfg.sample_with, cfg.iterations, cfg.eta, cfg.lr, cfg.preserve_at) == ("frozen", 500, 2.0, 1e-4, "own")
    _, red = toy_erasure("esd-x", "red")
    assert (red.sample_with, red.iterations, red.preserve_at) == ("current", 300, "own+concept")
    _, u = toy_erasure("esd-u", "triangle")  # shapes: batch 4, 100 iterations
    assert (u.sample_with, u.iterations, u.preserve_weight, u.batch_size) == ("current", 100, 1.0, 4)
    _, u = toy_erasure("esd-u", "striped")  # styles: the base setting
    assert (u.sample_with, u.iterations, u.preserve_weight, u.batch_size) == ("current", 300, 1.0, 1)
    _, u = toy_erasure("esd-u", "red")  # colours: the anchor weighted 10, batch 4
    assert (u.sample_with, u.iterations, u.preserve_weight, u.batch_size) == ("current", 300, 10.0, 4)
    _, cfg = toy_erasure("esd-x", "triangle", sample_with="current", iterations=7)
    assert (cfg.sample_with, cfg.iterations) == ("current", 7)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(DiffshieldError, match="unknown erasure method"):
        toy_erasure("esd-z", "triangle")


def _rates(model, detector, concept: str, k: int = 4) -> tuple[float, float]:
    c = resolve_concept(concept)
    asked = [(q, c.index) for w in c.words for q, _ in concept_prompts(c, w)]
    others = [(q, o.index) for o in other_concepts(c) for q, _ in concept_prompts(o)]
    prompts = [q for q, _ in asked + others for _ in range(k)]
    seeds = [s for _ in asked + others for s in range(k)]
    pred = detector.predict(generate(model, prompts, seeds, progress=False).images)[c.head][0]
    want = torch.tensor([i for _, i in asked + others for _ in range(k)])
    n = len(asked) * k
    return float((pred[:n] == c.index).float().mean()), float((pred[n:] == want[n:]).float().mean())


@pytest.mark.parametrize("concept,drawn_before,methods", [
    pytest.param("triangle", 0.9, ("rece",), marks=pytest.mark.long(140)),
    pytest.param("striped", 0.85, ("uce", "rece"), marks=pytest.mark.slow)])
def test_toy_setting_erases_the_concept_and_keeps_the_others(toy, concept, drawn_before, methods):
    """A shape and a style at their toy settings: the concept is (almost) gone, the other values of its kind stay.
    One test per concept, so that the unedited model's rates are computed once for its methods. UCE on the shape is
    the demo's erase step: ``test_demo_through_the_cli`` asserts the same bars on the demo's own figures (the same
    prompts and seeds for the erased concept; circles as the other shape), so it is not generated twice here. The
    style (576 images, the longest test) runs with ``pytest -m slow``; ``benchmarks/erasure.py`` checks the same
    bars on every concept and every other value."""
    base, det = toy
    before, kept_before = _rates(base, det, concept)
    assert before >= drawn_before
    failures = []
    for method in methods:
        model = copy.deepcopy(base)
        prompts, cfg = toy_erasure(method, concept)
        {"uce": uce_erase, "rece": rece_erase}[method](model, prompts, cfg)
        after, kept_after = _rates(model, det, concept)
        # the bars the docs claim: at most 10 % left, the other values of the kind down at most 5 points
        if after > 0.10:
            failures.append(f"{method} left {concept} in {after:.0%} of images")
        if kept_after < kept_before - 0.05:
            failures.append(f"{method}: others {kept_before:.1%} -> {kept_after:.1%}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("method", ["uce", "rece", "esd-x", "esd-u"])
def test_misspelt_recipe_override_is_refused_in_one_line(method):
    with pytest.raises(DiffshieldError, match="unknown .*setting 'lamda'") as info:
        toy_erasure(method, "red", lamda=0.3)
    assert "\n" not in str(info.value)

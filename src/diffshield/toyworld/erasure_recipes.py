"""The documented toy-world settings of each erasure method: which prompts to edit, what to guide to, what to keep.

Why the toy world needs its own prompt lists. The toy text encoder is 64 wide and causal: after the last word, every
row (EOS and padding) summarises the whole prompt, and the rows of different prompts differ by a few percent of
their norm. So

- a bare word ("triangle") is a poor stand-in for how the word is used ("a red striped triangle"): the closed-form
  edits (UCE, RECE) are built from *template prompts* that use the concept in context, as UCE's official code does
  for artists ("art by X", "painting by X", ...);
- the unconditional guide " " does not erase an attribute the image must have: "a red" still draws some shape,
  triangles among them (25 % by chance), so a concept is guided to a *partner* value of the same kind
  (triangle -> square, striped -> plain, red -> blue) and the other values are preserved with the same templates;
  striped went to dotted until world version 2 made the dots robust (on version 1 every guide took the dots down;
  on version 2 the guide dotted leaves 25.8 % of striped images striped and the guide plain 0 %);
- the templates never contain the evaluation prompts of :func:`diffshield.toyworld.concepts.concept_prompts`
  ("a {colour} {shape}" for shapes and colours, "a {colour} {style} {shape}" for styles): the benchmark measures
  how the edit generalises to prompts it did not see.

ESD fine-tunes on the concept prompts "a {word}" for the concept and its synonyms (negative guidance needs no guide),
anchoring the empty prompt and the other values of the kind to the original's predictions (see
:func:`esd_anchor_prompts`: on this text encoder plain ESD moves the unconditional prediction with the concept's, and
classifier-free guidance cancels the erasure).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from diffshield.toyworld.concepts import ToyConcept, other_concepts, resolve_concept
from diffshield.toyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, STYLES

#: the value each concept is guided to by the closed-form methods (same kind, visually unrelated)
PARTNER: dict[str, str] = {
    "circle": "square", "square": "circle", "triangle": "square", "star": "circle",
    "red": "blue", "green": "yellow", "blue": "red", "yellow": "green",
    "plain": "dotted", "striped": "plain", "dotted": "plain",
}


def edit_prompts(concept: ToyConcept, word: str) -> list[str]:
    """Template prompts that use ``word`` (a word for ``concept``'s kind) in context, excluding evaluation prompts."""
    w = word
    if concept.head == "shape":
        return ([f"a {w}"] + [f"a {s} {w}" for s in STYLES] + [f"a {w} on a {b} background" for b in BACKGROUNDS]
                + [f"a picture of a {w}"] + [f"a {c} {s} {w}" for c in COLOURS for s in STYLES]
                + [f"a {c} {w} on a {b} background" for c in COLOURS for b in BACKGROUNDS]
                + [f"a picture of a {c} {w}" for c in COLOURS])
    if concept.head == "colour":
        return ([f"a {w} {s} {sh}" for s in STYLES for sh in SHAPES]
                + [f"a {s} {w} {sh}" for s in STYLES for sh in SHAPES]
                + [f"a {w} {sh} on a {b} background" for sh in SHAPES for b in BACKGROUNDS]
                + [f"a picture of a {w} {sh}" for sh in SHAPES])
    return ([f"a {w} {sh}" for sh in SHAPES] + [f"a {w} {c} {sh}" for c in COLOURS for sh in SHAPES]
            + [f"a {w} {sh} on a {b} background" for sh in SHAPES for b in BACKGROUNDS]
            + [f"a {c} {w} {sh} on a {b} background" for c in COLOURS for sh in SHAPES for b in BACKGROUNDS]
            + [f"a picture of a {w} {sh}" for sh in SHAPES] + [f"a picture of a {c} {w} {sh}" for c in COLOURS
                                                               for sh in SHAPES])


def _with_synonyms(c: ToyConcept) -> list[str]:
    return list(c.words)


@dataclass
class ToyEditPrompts:
    """Prompt lists of a closed-form toy-world edit: ``concepts`` (to erase), ``guides`` (one per concept prompt,
    position-aligned: the same template with the partner word) and ``preserve`` (the templates of every other value
    of the concept's kind, synonyms included)."""

    concepts: list[str] = field(default_factory=list)
    guides: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)


def toy_edit_prompts(concept: str) -> ToyEditPrompts:
    """The template prompts of a closed-form (UCE / RECE) erasure of a toy concept (a synonym resolves to it)."""
    c = resolve_concept(concept)
    partner = resolve_concept(PARTNER[c.name])
    out = ToyEditPrompts()
    for i, w in enumerate(c.words):
        pw = partner.words[min(i, len(partner.words) - 1)]
        out.concepts += edit_prompts(c, w)
        out.guides += edit_prompts(c, pw)
    for o in other_concepts(c):
        for w in _with_synonyms(o):
            out.preserve += edit_prompts(c, w)
    return out


def esd_prompts(concept: str, mode: str = "words") -> list[str]:
    """The prompts ESD fine-tunes on for a toy concept (default mode "words").

    ``"words"``: "a {word}" for the concept and each synonym (for a style, "a {style} {shape}" for every shape: no
    evaluation prompt names a style without a colour). ``"templates"``: the closed-form methods' template prompts
    (:func:`edit_prompts`, concept and synonyms, interleaved), which use the word in context; ESD cycles through them.
    """
    from diffshield.core.errors import DiffshieldError

    c = resolve_concept(concept)
    if mode == "templates":
        lists = [edit_prompts(c, w) for w in c.words]
        return [p for group in zip(*lists) for p in group]
    if mode != "words":
        raise DiffshieldError(f"ESD prompt mode must be 'words' or 'templates', got {mode!r}")
    if c.head == "style":  # a texture alone ("a striped") barely differs from the empty prompt: name the shapes
        return [f"a {c.name} {s}" for s in SHAPES]
    return [f"a {w}" for w in c.words]


#: the anchor modes of :func:`esd_anchor_prompts`
ANCHOR_MODES = ("none", "others", "uncond+others", "uncond+templates")


def esd_anchor_prompts(concept: str, mode: str = "others") -> list[str]:
    """ESD's optional preservation anchor for a toy concept (default mode "others").

    ``"none"``: no anchor (the paper's ESD). ``"others"``: :func:`esd_prompts` ("words") of every other value of
    its kind (e.g. triangle -> "a circle", "a disc", "a square", ...). ``"uncond+others"``: the same list with the
    empty prompt "" before each entry, so that every other iteration anchors the *unconditional* prediction.
    ``"uncond+templates"``: the closed-form methods' preserved templates (:func:`edit_prompts` of every other value
    and its synonyms, in context: "a dotted red circle", "a plain star on a blue background", ...), the values taking
    turns, with "" before each entry.

    Why the empty prompt: the toy text encoder's rows for "a red" and "" are close, so plain ESD moves ε(x, ∅) about
    as much as ε(x, "a red") (measured on ESD-x red: both change by about 2x the concept's guidance signal
    ε*(c) − ε*(∅), cosine 0.93 at high noise; ``benchmarks/probes/erasure_esd_probe.py``), and classifier-free
    guidance, which subtracts ε(x, ∅), cancels most of the erasure (red: 0 % detected without guidance, 37.5 % at
    guidance 5).
    """
    from diffshield.core.errors import DiffshieldError

    if mode not in ANCHOR_MODES:
        raise DiffshieldError(f"ESD anchor mode must be one of {', '.join(ANCHOR_MODES)}, got {mode!r}")
    c = resolve_concept(concept)
    others = [p for o in other_concepts(c) for p in esd_prompts(o.name)]
    if mode == "none":
        return []
    if mode == "others":
        return others
    if mode == "uncond+templates":
        lists = [edit_prompts(c, w) for o in other_concepts(c) for w in _with_synonyms(o)]
        return [p for group in zip(*lists) for q in group for p in ("", q)]
    return [p for q in others for p in ("", q)]


#: UCE on the toy world: λ 0.5 (paper), s_e 3, s_p 1, paper2023 token mode, template prompts (see module docstring)
TOY_UCE = {"lamb": 0.5, "erase_scale": 3.0, "preserve_scale": 1.0, "token_mode": "paper2023"}
#: RECE on the toy world: the 'object-easy' preset (λ_r 0.1, 1 epoch) on top of TOY_UCE; its rounds preserve the
#: same templates with s_p 1, the empty prompt once (the concept is one kind of value written in 92 templates)
TOY_RECE = {"preset": "object-easy", "preserve_scale": 1.0, "round_empty_per_concept": False}
#: ESD on the toy world: 300 iterations at lr 1e-4 (the small model tolerates a 10x larger learning rate than SD),
#: start guidance 3; η 2 for ESD-x (η 1 left 15.6 % triangles; with the paper's target on ε*(∅) this is a stronger
#: push than the official esd_sd.py's η 2, which starts from ε*(c)), η 1 for ESD-u; and, beyond the
#: paper, the "uncond+others" anchor (:func:`esd_anchor_prompts`), without which guidance cancels the erasure
TOY_ESD = {"x": {"iterations": 300, "lr": 1e-4, "eta": 2.0, "preserve": "uncond+others"},
           "u": {"iterations": 300, "lr": 1e-4, "eta": 1.0, "preserve": "uncond+others"}}
#: per-kind refinements of :data:`TOY_ESD`, like RECE's per-kind presets (applied before the caller's overrides).
#: ESD-x on shapes and styles: x_t sampled by the frozen original UNet (the official esd_sd.py's sampler,
#: ``sample_with="frozen"``) for 500 iterations; with the fine-tuned UNet as sampler, x_t stops showing the concept as
#: it fades and ESD-x trades the neighbours for the last images (shape: others 100 -> 91.7 %). On colours: the base
#: setting with every anchor also held at the concept's own x_t (``preserve_at="own+concept"``); the base setting
#: alone erases red on some evaluation seeds only (6.2 % left on seeds 0-7, 21.9 % on 100-107) and loses the other
#: colours 100 iterations later (86.5 %), and the frozen sampler leaves 68.8 % of red after 500 iterations. The
#: settings were read off ``benchmarks/probes/erasure_esd_trajectory.py`` runs and checked on held-out evaluation seeds
#: (docs/erase.md, findings). ESD-u on colours: the anchor weighted 10 at batch 4 (the documented weight 1 turns
#: green prompts blue within 50 iterations; weight 10 at batch 1 swings between erasing and not from one checkpoint
#: to the next). ESD-u on shapes: batch 4 for 100 iterations (at batch 1 the other shapes lose 9.4 points; weight 10
#: at batch 4 does not erase the triangle in 200 iterations). Styles have no ESD-u setting that meets the bars
#: (weight 10 at batch 4 loses the dots within 100 iterations; nor do the anchor at the concept's x_t, the guided
#: anchor, lr 3e-5, esd_sd.py's lr 5e-5 / η 2, the frozen sampler, ``min_step`` 25 or the template anchors): the
#: UNet's guidance signals for striped and dotted point the same way (cosine 0.61,
#: ``benchmarks/probes/erasure_signal_overlap.py``), and ESD-u can only act on what they share.
TOY_ESD_KIND = {"x": {"shape": {"sample_with": "frozen", "iterations": 500},
                      "style": {"sample_with": "frozen", "iterations": 500},
                      "colour": {"preserve_at": "own+concept"}},
                "u": {"shape": {"batch_size": 4, "iterations": 100},
                      "colour": {"preserve_weight": 10.0, "batch_size": 4}}}

METHODS = ("uce", "rece", "esd-x", "esd-u")


def toy_erasure(method: str, concept: str, **overrides) -> tuple[list[str], object]:
    """(prompts to erase, method config) of the documented toy-world setting of ``method`` for ``concept``.

    Args:
        method: "uce", "rece", "esd-x" or "esd-u".
        concept: a toy concept word (shape, colour or style; a synonym resolves to its concept).
        overrides: fields of the method's config to change (e.g. ``iterations=100`` or ``checkpoint_dir=...``);
            for RECE also ``uce={...}``, settings of its first (UCE) edit; for ESD also
            ``prompts="words"|"templates"`` (see :func:`esd_prompts`) and ``preserve="none"``,
            ``"others"``, ``"uncond+others"`` or ``"uncond+templates"`` (the anchors of
            :func:`esd_anchor_prompts`) or a list of prompts.
    Returns the list to pass as ``concepts`` to the method's erase function, and its config object.
    """
    from diffshield.core.errors import DiffshieldError
    from diffshield.erase.esd import ESDUConfig, ESDXConfig
    from diffshield.erase.rece import RECEConfig
    from diffshield.erase.uce import UCEConfig

    def check(known: set[str]) -> None:  # RECE's presets check their own overrides
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DiffshieldError(f"unknown {method} setting {unknown[0]!r}; settings: {', '.join(sorted(known))}")

    if method in ("uce", "rece"):
        if method == "uce":
            check({f.name for f in fields(UCEConfig)})
        p = toy_edit_prompts(concept)
        uce = UCEConfig(guides=p.guides, preserve=p.preserve, **TOY_UCE)
        if method == "uce":
            for k, v in overrides.items():
                setattr(uce, k, v)
            uce.__post_init__()
            return p.concepts, uce
        for k, v in dict(overrides.pop("uce", None) or {}).items():  # settings of the first (UCE) edit
            if k not in {f.name for f in fields(UCEConfig)}:
                raise DiffshieldError(f"unknown uce setting {k!r}; settings: "
                                      f"{', '.join(sorted(f.name for f in fields(UCEConfig)))}")
            setattr(uce, k, v)
        uce.__post_init__()
        settings = {k: v for k, v in TOY_RECE.items() if k != "preset"}
        cfg = RECEConfig.from_preset(TOY_RECE["preset"], uce=uce, round_preserve=[""] + p.preserve,
                                     **{**settings, **overrides})
        return p.concepts, cfg
    if method in ("esd-x", "esd-u"):
        variant = method[-1]
        cls = ESDXConfig if variant == "x" else ESDUConfig
        check({f.name for f in fields(cls)} | {"prompts"})
        settings = {**TOY_ESD[variant], **TOY_ESD_KIND[variant].get(resolve_concept(concept).head, {}), **overrides}
        mode = settings.pop("prompts", "words")
        if settings.get("preserve") in ANCHOR_MODES:
            settings["preserve"] = esd_anchor_prompts(concept, settings["preserve"])
        return esd_prompts(concept, mode), cls(variant=variant, **settings)
    raise DiffshieldError(f"unknown erasure method {method!r}; choose one of: {', '.join(METHODS)}")


def concept_words() -> list[str]:
    """Every toy concept word, synonyms included, grouped by kind: the words a toy erasure accepts."""
    from diffshield.toyworld.shapes import SYNONYMS

    return [w for s in SHAPES for w in (s, SYNONYMS[s])] + list(COLOURS) + list(STYLES)


def check_toy_concept(word: str) -> str:
    """The toy concept ``word`` names (a synonym resolves to its concept), or a one-line refusal listing the words."""
    from diffshield.core.errors import DiffshieldError

    try:
        return resolve_concept(word).name
    except DiffshieldError:
        raise DiffshieldError(f"{word!r} is not in the toy model's vocabulary of concepts; known words: "
                              f"{', '.join(concept_words())}") from None


def _vocab_words(folder) -> set[str] | None:
    """Whole-word tokens of a model folder's tokenizer (``tokenizer/tokenizer.json`` or ``vocab.json``), or None."""
    import json
    from pathlib import Path

    for name in ("tokenizer.json", "vocab.json"):
        path = Path(folder) / "tokenizer" / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            vocab = data.get("model", {}).get("vocab", {}) if name == "tokenizer.json" else data
            if not isinstance(vocab, dict):
                return None
            if len(vocab) >= 10_000:  # a full-size tokenizer: not a toy model
                return set()
            return {t[:-4] for t in vocab if isinstance(t, str) and t.endswith("</w>")}
    return None


def is_toy_model(spec) -> bool:
    """Whether a model spec is a toy-world text-to-image model: ``toy:t2i``, or a folder (a saved or erased toy
    model) whose tokenizer has a small vocabulary holding every toy concept word."""
    from diffshield.core.loading import resolve_model_path

    if str(spec).startswith("toy:"):
        return True
    words = _vocab_words(resolve_model_path(spec))
    return bool(words) and all(w in words for w in concept_words())

"""Concepts of the toy world: which detector head judges a word, its synonyms, and prompts that ask for it.

A concept is a shape ("triangle", or its synonym "wedge"), a colour ("red") or a texture style ("striped").
"""

from __future__ import annotations

from dataclasses import dataclass

from diffshield.core.errors import DiffshieldError
from diffshield.toyworld.shapes import COLOURS, SHAPES, STYLES, SYNONYMS

HEAD_VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


@dataclass(frozen=True)
class ToyConcept:
    """A toy-world concept: ``head`` (shape | colour | style), ``index`` into that head's labels, ``name``
    (canonical word) and ``synonyms`` (other words for it)."""

    head: str
    index: int
    name: str
    synonyms: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        return (self.name,) + self.synonyms


def resolve_concept(word: str) -> ToyConcept:
    """The toy concept a word names (a synonym resolves to its canonical concept)."""
    w = word.strip().lower()
    inverse = {v: k for k, v in SYNONYMS.items()}
    w = inverse.get(w, w)
    for head, values in HEAD_VALUES.items():
        if w in values:
            syn = (SYNONYMS[w],) if head == "shape" else ()
            return ToyConcept(head, values.index(w), w, syn)
    known = ", ".join(SHAPES + COLOURS + STYLES)
    raise DiffshieldError(f"{word!r} is not a toy-world concept; choose one of: {known}")


def prompt_for(shape: str, colour: str | None = None, style: str | None = None) -> str:
    """'a {colour} {style} {shape}' with the unnamed parts left out."""
    return "a " + " ".join(w for w in (colour, style, shape) if w)


def concept_prompts(concept: ToyConcept, word: str | None = None) -> list[tuple[str, dict[str, int]]]:
    """Prompts that ask for ``concept`` (using ``word``, default its name), each with the labels it asks for.

    A shape is asked for in every colour; a colour on every shape; a style on every shape in every colour.
    """
    word = word or concept.name
    out = []
    if concept.head == "shape":
        for ci, c in enumerate(COLOURS):
            out.append((prompt_for(word, c), {"shape": concept.index, "colour": ci}))
    elif concept.head == "colour":
        for si, s in enumerate(SHAPES):
            out.append((prompt_for(s, word), {"shape": si, "colour": concept.index}))
    else:
        for si, s in enumerate(SHAPES):
            for ci, c in enumerate(COLOURS):
                out.append((prompt_for(s, c, word), {"shape": si, "colour": ci, "style": concept.index}))
    return out


def other_concepts(concept: ToyConcept) -> list[ToyConcept]:
    """The other values of the same head (e.g. circle, square, star for triangle)."""
    values = HEAD_VALUES[concept.head]
    return [resolve_concept(v) for v in values if v != concept.name]

"""What every erasure method shares: the result type, the registry and helpers to find cross-attention weights.

A method is registered as ``ERASERS.register(name)((ConfigClass, erase_fn))`` where
``erase_fn(model: T2IModel, concepts: list[str], config) -> EraseResult`` edits ``model`` in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.registry import Registry

#: name -> (config dataclass, erase function)
ERASERS: Registry[tuple[type, object]] = Registry("erasure method")


@dataclass
class EraseResult:
    """Outcome of an erasure run.

    Attributes:
        model: the edited model (the same object that was passed in, edited in place).
        changed: UNet parameter name -> new tensor, for every parameter the method changed (the delta).
        method: registry name of the method. config: the method config as a JSON-able dict.
        seconds: edit time (excluding model load and, for closed forms, text encoding).
        fraction_changed: share of UNet parameters (by element count) that the method changed.
        extra: method-specific facts (e.g. RECE per-epoch scores, ESD losses).
        base_values: for each changed parameter, :func:`probe_values` of it *before* the edit (a delta records
            them, so that it is never applied over a model whose edited layers were changed since).
    """

    model: T2IModel
    changed: dict[str, torch.Tensor]
    method: str
    config: dict
    seconds: float
    fraction_changed: float
    extra: dict = field(default_factory=dict)
    base_values: dict[str, list[float]] = field(default_factory=dict)


#: values per tensor in a probe (:func:`probe_values`)
PROBE_VALUES = 64


def probe_values(p: torch.Tensor) -> list[float]:
    """:data:`PROBE_VALUES` evenly spaced values of a tensor, as float32 numbers: a fingerprint that survives a
    change of device or dtype (compared with a tolerance)."""
    flat = p.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(PROBE_VALUES, flat.numel()), device=flat.device).long()
    return flat[idx].float().cpu().tolist()


def cross_attention_kv(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """All ``attn2.to_k`` / ``attn2.to_v`` linear layers of a UNet2DConditionModel, with their module names.

    These read the text embeddings (k = W_k c, v = W_v c); SD 1.x has 16 attn2 modules, so 32 matrices.
    """
    out = []
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            out.append((name, mod))
    return out


def fraction_of_unet(unet: torch.nn.Module, names: list[str]) -> float:
    """Share of UNet parameter elements held by the parameters ``names``."""
    params = dict(unet.named_parameters())
    total = sum(p.numel() for p in params.values())
    return sum(params[n].numel() for n in names) / total


def _words(prompt: str) -> str:
    """A prompt as CLIP's tokenizer reads it: lower case, runs of whitespace as one space, no outer spaces."""
    return " ".join(prompt.lower().split())


def check_prompt_roles(concepts: list[str], guides: list[str] = (), preserve: list[str] = ()) -> None:
    """Refuse an erasure whose prompts contradict each other (before any work): a concept that is also preserved,
    or a concept guided to itself (the edit would map it onto itself and erase nothing). Prompts are compared as
    the tokenizer reads them (case and spacing ignored); ``guides`` pairs with ``concepts`` one to one. A concept
    given twice is refused too: each copy adds its rows to the edit (or its share of ESD's draws), which doubled the
    erase strength without a word."""
    seen: dict[str, str] = {}
    for c in concepts:
        if _words(c) in seen:
            raise DiffshieldError(f"{c!r} is erased twice ({seen[_words(c)]!r} is the same prompt); give each concept "
                                  "once (a stronger edit: --erase-scale)")
        seen[_words(c)] = c
    kept = {_words(p) for p in preserve}
    for c in concepts:
        if _words(c) in kept:
            raise DiffshieldError(f"{c!r} is both erased and preserved; remove it from preserve")
    for c, g in zip(concepts, guides):
        if _words(c) == _words(g):
            raise DiffshieldError(f"{c!r} is its own guide: the edit would map it onto itself and erase nothing; "
                                  "choose another guide (default ' ', the unconditional prompt)")

"""UCE: Unified Concept Editing in Diffusion Models (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024).

A closed-form edit of the cross-attention key/value matrices. For every ``attn2.to_k`` / ``attn2.to_v`` matrix W:

    W_new = (λ W + s_e Σ_i W T_iᵀ K_i + s_p Σ_j W P_jᵀ P_j) · (λ I + s_e Σ_i K_iᵀ K_i + s_p Σ_j P_jᵀ P_j)⁻¹

K_i: text-embedding rows of concept i (to erase), T_i: rows of its guide, position-aligned with K_i (the keys and
values of the concept are moved to those of the guide), P_j: rows of preserved prompts (their keys and values
should stay). All 32 matrices of SD 1.x share the same right factor, so the edit is W_new = W · G with one d x d G
(see :mod:`diffshield.erase.closed_form`).

The official 2023 script (``train-scripts/train_erase.py``) also has the ``tensor`` technique: the target of a
concept's keys/values is the guide's W T_i with its component along the concept's own W K_i removed,
W T_i − (⟨W K_i, W T_i⟩ / ‖W K_i‖²) W K_i (Frobenius products over the concept's rows, per matrix), so each matrix
gets its own correction to G (:func:`diffshield.erase.closed_form.tensor_correction`). Its prompt expansion
(``--add_prompts``) adds five templates per concept (:data:`EXPANSION_TEMPLATES`), each moved to the concept's
guide, and its preserve scale is max(0.1, 1 / len(preserved prompts, "" included)) unless one is given.

Example::

    from diffshield.core.loading import load_t2i
    from diffshield.erase.uce import UCEConfig, uce_erase

    model = load_t2i("toy:t2i")
    result = uce_erase(model, ["square"], UCEConfig(preserve=["circle"]))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from diffshield.core.checks import check_config, check_finite_fields
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import check_model, encode_prompts
from diffshield.erase.base import ERASERS, EraseResult, check_prompt_roles, fraction_of_unet, probe_values
from diffshield.erase.closed_form import (
    apply_shared,
    apply_tensor,
    embedding_width,
    kv_layers,
    last_word_index,
    shared_edit_matrix,
    tensor_correction,
    token_ids,
)

TOKEN_MODES = ("paper2023", "last", "changed")
#: UCE techniques of the official 2023 script: "replace" (its default) and "tensor"
TECHNIQUES = ("replace", "tensor")
#: the official 2023 script's prompt expansion (``--add_prompts``) per concept type; the concept itself comes first
EXPANSION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "art": ("painting by {concept}", "art by {concept}", "artwork by {concept}", "picture by {concept}",
            "style of {concept}"),
    "object": ("image of {concept}", "photo of {concept}", "portrait of {concept}", "picture of {concept}",
               "painting of {concept}"),
}


def auto_preserve_scale(n_preserved: int) -> float:
    """The official 2023 script's default preserve scale, max(0.1, 1 / n) for n preserved prompts ("" included)."""
    return max(0.1, 1.0 / max(1, n_preserved))


@dataclass
class UCEConfig:
    """Settings of a UCE edit.

    Args:
        guides: what each concept is moved to: one guide for all concepts or one per concept, in concept order
            (default [" "]: the unconditional prompt; use "art" for artist styles). A single string is accepted.
        preserve: prompts whose keys/values should not change (default []); the empty prompt "" is always added.
        lamb: λ, the weight of the current matrix in the least-squares problem (default 0.5; must be > 0).
        erase_scale: s_e, weight of the erased concepts (default 1.0). Too large a scale damages unrelated
            prompts: check them after the edit.
        preserve_scale: s_p, weight of the preserved prompts: a number >= 0, or "auto" (default), the official
            2023 script's max(0.1, 1 / n) for n preserved prompts with "" (1.0 when only "" is preserved; 0.1 from
            ten prompts on, as for its artist lists). The 2025 script (``uce_sd_erase.py``) defaults to 1.0.
        technique: "replace" (default; the official 2023 script's default and the paper's formula) or "tensor"
            (the same script's other technique: the guide's keys/values minus their component along the concept's,
            per matrix; not available in RECE, whose rounds use the shared form W · G).
        expand_prompts: None (default), "art" or "object": also erase the official 2023 script's five templates
            per concept (:data:`EXPANSION_TEMPLATES`: "painting by {concept}", ... or "image of {concept}", ...),
            each moved to the concept's guide, as its ``--add_prompts``.
        token_mode: which text-embedding rows enter the edit (default "paper2023"):
            "paper2023" (official 2023 code): concept rows from its last word token to the end of the 77 rows
            (EOS and padding included), aligned by offset with the guide's rows from the guide's last word token
            (BOS for the guide " "); preserved prompts use all rows.
            "last": one row per prompt, its last word token (concept, guide and preserved prompts), the rows the
            2025 script ``uce_sd_erase.py`` uses; unlike that script, the empty prompt's row (BOS) is still
            preserved, which changes the weights (by 11 % on SD 1.4).
            "changed" (beyond the papers): concept and guide rows from the first token where the two prompts differ
            to the end, at the same positions; preserved prompts use all rows. For a guide that is the concept's
            prompt with one word swapped ("a red striped triangle" -> "a red dotted triangle") these are exactly the
            rows the swap changes, the concept word's own row included, which "paper2023" leaves out when the
            concept is not the prompt's last word.
    """

    guides: list[str] = field(default_factory=lambda: [" "])
    preserve: list[str] = field(default_factory=list)
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | str = "auto"
    token_mode: str = "paper2023"
    technique: str = "replace"
    expand_prompts: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.guides, str):
            self.guides = [self.guides]
        if isinstance(self.preserve, str):
            self.preserve = [self.preserve]
        self.guides, self.preserve = list(self.guides), list(self.preserve)
        if not self.guides:
            raise DiffshieldError("guides must hold at least one prompt (use ' ' for the unconditional prompt)")
        if not all(isinstance(g, str) for g in self.guides + self.preserve):
            raise DiffshieldError("guides and preserve must be lists of strings")
        for name in ("lamb", "erase_scale") + (() if self.preserve_scale == "auto" else ("preserve_scale",)):
            setattr(self, name, config_number(getattr(self, name), name))
        check_finite_fields(self)  # inf / NaN settings would write a broken model
        if not self.lamb > 0:
            raise DiffshieldError(f"lamb must be > 0 (it keeps the solve well posed), got {self.lamb}")
        if not self.erase_scale > 0:
            raise DiffshieldError(f"erase_scale must be > 0, got {self.erase_scale}")
        if self.preserve_scale != "auto" and (isinstance(self.preserve_scale, (str, bool))
                                              or not self.preserve_scale >= 0):
            raise DiffshieldError(f"preserve_scale must be a number >= 0 or 'auto', got {self.preserve_scale!r}")
        if self.technique not in TECHNIQUES:
            raise DiffshieldError(f"technique must be one of {', '.join(TECHNIQUES)}, got {self.technique!r}")
        if self.expand_prompts is not None and self.expand_prompts not in EXPANSION_TEMPLATES:
            raise DiffshieldError(f"expand_prompts must be None or one of {', '.join(EXPANSION_TEMPLATES)}, got "
                                  f"{self.expand_prompts!r}")
        if self.token_mode not in TOKEN_MODES:
            raise DiffshieldError(f"token_mode must be one of {', '.join(TOKEN_MODES)}, got {self.token_mode!r}")


def config_number(value: object, name: str) -> float:
    """A numeric setting as a Python float, or a one-line DiffshieldError naming it: NumPy and 0-d tensor numbers
    are converted (a NumPy float32 inf passed the finiteness check and wrote inf into the weights, and a NumPy
    number made the result's config unserialisable), strings and bools are refused."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise DiffshieldError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise DiffshieldError(f"{name} must be a number, got {value!r}") from None



def check_concepts(concepts: list[str] | str) -> list[str]:
    """Validate the concept list (a single string is one concept)."""
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(concepts)
    if not concepts:
        raise DiffshieldError("give at least one concept to erase")
    for c in concepts:
        if not isinstance(c, str) or not c.strip():
            raise DiffshieldError(f"concepts must be non-empty strings, got {c!r}")
    return concepts


def expand_prompts(concepts: list[str], guides: list[str], kind: str | None) -> tuple[list[str], list[str]]:
    """(concepts, guides) with the official 2023 script's templates of ``kind`` ("art" / "object") added after each
    concept, each template guided to its concept's guide (``kind`` None: unchanged)."""
    guides = expand_guides(guides, concepts)
    if kind is None:
        return list(concepts), guides
    out_c, out_g = [], []
    for c, g in zip(concepts, guides):
        group = [c] + [t.format(concept=c) for t in EXPANSION_TEMPLATES[kind]]
        out_c += group
        out_g += [g] * len(group)
    return out_c, out_g


def preserve_list(config: UCEConfig) -> list[str]:
    """The preserved prompts of an edit: "" first, then ``config.preserve`` without repeats."""
    return list(dict.fromkeys([""] + config.preserve))


def preserve_scale_of(config: UCEConfig) -> float:
    """s_p of an edit: ``config.preserve_scale``, or the 2023 rule max(0.1, 1 / n) for "auto"."""
    if config.preserve_scale == "auto":
        return auto_preserve_scale(len(preserve_list(config)))
    return float(config.preserve_scale)


def expand_guides(guides: list[str], concepts: list[str]) -> list[str]:
    """One guide per concept: a single guide is used for all concepts."""
    if len(guides) == 1:
        return guides * len(concepts)
    if len(guides) != len(concepts):
        raise DiffshieldError(f"{len(guides)} guides for {len(concepts)} concepts; give one guide, or one per concept")
    return list(guides)


def check_uce_prompts(concepts: list[str], config: UCEConfig) -> tuple[list[str], list[str]]:
    """(concepts, guides) of an edit, templates expanded, after refusing contradictory prompts (a concept also
    preserved, or guided to itself); needs no model, so callers check before loading one."""
    concepts, guides = expand_prompts(check_concepts(concepts), config.guides, config.expand_prompts)
    check_prompt_roles(concepts, guides, preserve_list(config))
    return concepts, guides


def uce_rows(
    model: T2IModel, concepts: list[str], config: UCEConfig
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """The text-embedding rows of a UCE edit: ([(K_i, T_i) per concept], [P_j per preserved prompt]).

    Encodes every prompt once (text encoding; not part of the edit's time) and selects rows by ``token_mode``.
    """
    concepts, guides = check_uce_prompts(concepts, config)
    preserve = preserve_list(config)
    prompts = list(dict.fromkeys(concepts + guides + preserve))
    emb = dict(zip(prompts, encode_prompts(model, prompts)))
    last = dict(zip(prompts, last_word_index(model, prompts)))
    ids = dict(zip(prompts, token_ids(model, prompts))) if config.token_mode == "changed" else {}
    length = next(iter(emb.values())).shape[0]

    pairs = []
    for c, g in zip(concepts, guides):
        ic, ig = last[c], last[g]
        if config.token_mode == "last":
            pairs.append((emb[c][ic:ic + 1], emb[g][ig:ig + 1]))
        elif config.token_mode == "changed":  # from the first differing token to the end, same positions
            differ = (ids[c] != ids[g]).nonzero()
            i0 = int(differ[0]) if len(differ) else ic
            pairs.append((emb[c][i0:], emb[g][i0:]))
        else:  # paper2023: from the last word to the end, aligned by offset; both slices have the same length
            n = length - max(ic, ig)
            pairs.append((emb[c][ic:ic + n], emb[g][ig:ig + n]))
    if config.token_mode == "last":
        kept = [emb[p][last[p]:last[p] + 1] for p in preserve]
    else:
        kept = [emb[p] for p in preserve]
    return pairs, kept


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.norm() / b.norm().clamp_min(1e-12))


def uce_erase(model: T2IModel, concepts: list[str], config: UCEConfig | None = None) -> EraseResult:
    """Erase concepts from ``model`` in place with UCE (Gandikota et al., WACV 2024); several concepts in one edit.

    Args:
        model: the text-to-image model; its UNet's cross-attention K/V weights are overwritten.
        concepts: prompts of the concepts to erase (e.g. ["nudity"] or ["Van Gogh", "Monet"]).
        config: guides, preserved prompts, λ, scales, token mode (default UCEConfig()).

    Returns:
        EraseResult with the changed K/V weights (clones), the edit time (text encoding excluded) and, in
        ``extra``: ``embedding_drift_preserved`` (||P Gᵀ - P|| / ||P|| over all preserved rows: 0 means their keys
        and values are untouched, since W_new p = W (G p)) and ``gap_left_erased`` (||K Gᵀ - T|| / ||K - T||: 0
        means the concepts' keys and values now equal the guides', 1 that they did not move).
    """
    check_model(model)
    config = check_config(config, UCEConfig, "uce_erase's config")
    concepts = check_concepts(concepts)
    layers = kv_layers(model.unet)
    pairs, kept = uce_rows(model, concepts, config)
    if pairs[0][0].shape[-1] != embedding_width(model.unet):
        raise DiffshieldError(f"text embeddings have width {pairs[0][0].shape[-1]} but the cross-attention layers "
                              f"read {embedding_width(model.unet)}")

    s_p = preserve_scale_of(config)
    base_values = {name: probe_values(mod.weight) for name, mod in layers}
    start = time.perf_counter()
    g = shared_edit_matrix(pairs, kept, config.lamb, config.erase_scale, s_p)
    if config.technique == "tensor":  # per-matrix corrections, from the weights before the edit
        apply_tensor(layers, g, tensor_correction(pairs, kept, config.lamb, config.erase_scale, s_p))
    else:
        apply_shared(layers, g)
    seconds = time.perf_counter() - start

    changed = {name: mod.weight.detach().clone() for name, mod in layers}
    g = g.cpu()
    kept_rows = torch.cat([p.cpu().double() for p in kept])
    k_rows = torch.cat([k.cpu().double() for k, _ in pairs])
    t_rows = torch.cat([t.cpu().double() for _, t in pairs])
    extra = {
        "n_matrices": len(layers),
        "preserve_scale": s_p,
        "rows_erased": k_rows.shape[0],
        "rows_preserved": kept_rows.shape[0],
        "embedding_drift_preserved": _ratio(kept_rows @ g.T - kept_rows, kept_rows),
        "gap_left_erased": _ratio(k_rows @ g.T - t_rows, k_rows - t_rows),
    }
    return EraseResult(model=model, changed=changed, method="uce", config=asdict(config), seconds=seconds,
                       fraction_changed=fraction_of_unet(model.unet, list(changed)), extra=extra,
                       base_values=base_values)


ERASERS.register("uce")((UCEConfig, uce_erase))

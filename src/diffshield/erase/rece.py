"""RECE: Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (Gong, Chen et al.; ECCV 2024).

UCE (Gandikota et al., WACV 2024) erases a concept's own embedding, but other embeddings may still regenerate it.
RECE starts from a UCE edit and repeats, for a few epochs:

1. Find, in closed form, the embedding C' that the *edited* K/V matrices W' map closest to what the *original*
   matrices W0 make of the concept embedding C (all token rows, BOS/EOS/padding included), over all matrices at once:

       C' = argmin Σ_l ||W'_l c' - W0_l c||² + λ_r ||c'||²   =>   C' = C · ((λ_r I + Σ W'ᵀW')⁻¹ Σ W'ᵀW0)ᵀ

   (variant "regzero"; variant "standard" regularises towards the guide instead: λ_r ||c' - c_old||²; variant
   "surrogate" is the official code's surrogate regularisation, see
   :func:`~diffshield.erase.closed_form.adversarial_solve`).
2. Erase C' with the UCE formula (guide = the concept's guide, all rows aligned; λ = 0.1, s_p = 0.1). The official
   nudity/unsafe script (``train.py``) preserves " " once per concept (``retain_texts = [' ' for _ in concepts]``):
   here "" (the same token ids) counts once per concept by default; its object script (``train_object.py``)
   preserves "" and the given prompts once (``round_preserve``, ``round_empty_per_concept=False``).
3. Optionally score the epoch with a validation callable and keep the best epoch (the official scripts keep the
   epoch with the lowest validation detection rate: :mod:`diffshield.erase.select`).

Every step is W ← W · G with one d x d matrix G, so the whole run is W = W0 · G_1 · G_2 ⋯ and Σ W'ᵀW' = Gᵀ S0 G
with S0 = Σ W0ᵀW0 computed once (:mod:`diffshield.erase.closed_form`). The weights are written after every epoch
only when a ``select`` callable must look at them; otherwise once at the end.

The adversarial embedding is also a white-box attack on any erased model: :func:`adversarial_embedding_for`.

Example::

    from diffshield.erase.rece import RECEConfig, rece_erase

    result = rece_erase(model, ["nudity"], RECEConfig.from_preset("nudity"))
    print(result.extra["epochs"])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from diffshield.core.checks import check_config, check_finite_fields
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import check_model, encode_prompts
from diffshield.erase.base import ERASERS, EraseResult, check_prompt_roles, fraction_of_unet, probe_values
from diffshield.erase.closed_form import (
    adversarial_solve,
    apply_shared,
    cross_gram_sum,
    embedding_width,
    gram_sum,
    kv_layers,
    kv_weights,
    shared_edit_matrix,
)
from diffshield.erase.uce import (
    UCEConfig,
    check_concepts,
    check_uce_prompts,
    config_number,
    expand_guides,
    preserve_scale_of,
    uce_rows,
)

VARIANTS = ("regzero", "standard", "surrogate")
SURROGATE_ITEMS = ("1st", "2nd", "both")

#: preset name -> (lamb_r, epochs), from the RECE paper's settings.
PRESETS: dict[str, tuple[float, int]] = {
    "nudity": (0.1, 3),
    "unsafe": (0.1, 2),
    "style": (1e-3, 1),
    "object": (1e-3, 1),
    "object-easy": (0.1, 1),
}


# --- Step 1: the adversarial embedding ------------------------------------------------------------------------------


def adversarial_embedding(
    W_current_list: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    W_original_list: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    C: torch.Tensor,
    lamb_r: float = 0.1,
    variant: str = "regzero",
    c_old: torch.Tensor | None = None,
    surrogate_item: str = "1st",
) -> torch.Tensor:
    """RECE's closed-form adversarial embedding C' for edited K/V weights (Gong et al., ECCV 2024).

    C' = argmin_{c'} Σ_l ||W'_l c' - W0_l c||² + λ_r ||c'||² = C · ((λ_r I + Σ W'ᵀW')⁻¹ Σ W'ᵀW0)ᵀ, row by row.

    Args:
        W_current_list: the edited K/V matrices W'_l (out_l, d), a list or a name -> tensor dict.
        W_original_list: the original matrices W0_l in the same order (or a dict with the same names).
        C: the concept's text embedding, (L, d) or (B, L, d); use every token row (BOS, EOS and padding too).
        lamb_r: λ_r, the regularisation (default 0.1; the paper uses 1e-3 for styles and hard objects).
        variant: "regzero" (default, ||c'||²), "standard" (||c' - c_old||²) or "surrogate" (the official code's
            surrogate regularisation; see :func:`~diffshield.erase.closed_form.adversarial_solve`).
        c_old: for "standard": the embedding to stay close to, shaped like C or broadcastable (default None).
        surrogate_item: for "surrogate": "1st" (default, the official training scripts'), "2nd" or "both".

    Returns:
        C' with the shape, dtype and device of C: feed it as ``prompt_embeds`` to
        :func:`diffshield.core.sampling.generate` to see what the edited model makes of it.
    """
    if isinstance(W_current_list, Mapping) and isinstance(W_original_list, Mapping):
        missing = sorted(set(W_current_list) ^ set(W_original_list))
        if missing:
            raise DiffshieldError(f"current and original K/V weights do not match: {missing[0]!r} is in only one")
        names = list(W_current_list)
        current = [W_current_list[n] for n in names]
        original = [W_original_list[n] for n in names]
    else:
        current = list(W_current_list.values() if isinstance(W_current_list, Mapping) else W_current_list)
        original = list(W_original_list.values() if isinstance(W_original_list, Mapping) else W_original_list)
    if len(current) != len(original):
        raise DiffshieldError(f"{len(current)} current but {len(original)} original K/V weights")
    if C.shape[-1] != current[0].shape[1]:
        raise DiffshieldError(f"embedding width {C.shape[-1]} does not match the K/V input width "
                              f"{current[0].shape[1]}")
    with torch.no_grad():
        return adversarial_solve(gram_sum(current), cross_gram_sum(current, original), C, lamb_r, variant, c_old,
                                 surrogate_item)


def adversarial_embedding_for(
    model_edited: T2IModel,
    model_original_kv_weights: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | T2IModel,
    prompt: str | list[str],
    lamb_r: float = 0.1,
    variant: str = "regzero",
    old_prompt: str = " ",
) -> torch.Tensor:
    """The adversarial embedding of a prompt against an erased model, ready for ``generate(prompt_embeds=...)``.

    Args:
        model_edited: the erased model (its text encoder is used to encode ``prompt``).
        model_original_kv_weights: the original K/V weights: :func:`~diffshield.erase.closed_form.kv_weights` of
            the model before erasure, a list in :func:`~diffshield.erase.closed_form.kv_layers` order, or the
            original T2IModel itself.
        prompt: the concept prompt(s), e.g. "nudity".
        lamb_r: λ_r (default 0.1). variant: "regzero" (default) or "standard".
        old_prompt: for "standard", the prompt whose embedding C' is kept close to (default " ").

    Returns:
        (B, 77, d) embeddings, one per prompt.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    original = model_original_kv_weights
    if isinstance(original, T2IModel):
        original = kv_weights(original)
    current = {name: mod.weight for name, mod in kv_layers(model_edited.unet)}
    if not isinstance(original, Mapping):
        original = list(original)
        if len(original) != len(current):
            raise DiffshieldError(f"{len(original)} original K/V weights for {len(current)} K/V layers")
        original = dict(zip(current, original))
    c = encode_prompts(model_edited, prompts)
    c_old = encode_prompts(model_edited, [old_prompt] * len(prompts)) if variant == "standard" else None
    return adversarial_embedding(current, original, c, lamb_r, variant, c_old)


# --- The method -----------------------------------------------------------------------------------------------------


@dataclass
class RECEConfig:
    """Settings of a RECE run (defaults: the paper's nudity setting). Build presets with :meth:`from_preset`.

    Args:
        epochs: rounds of (adversarial embedding, UCE edit) after the initial UCE edit (default 3; 0 = UCE only).
        lamb_r: λ_r, regularisation of the adversarial embedding (default 0.1).
        variant: "regzero" (default: λ_r ||c'||²), "standard" (λ_r ||c' - c_guide||², the guide's embedding) or
            "surrogate" (the official code's surrogate regularisation, ``close_surrogatereg``).
        surrogate_item: which terms the surrogate keeps: "1st" (default, the official training scripts'), "2nd" or
            "both" (used only by the "surrogate" variant).
        lamb2: λ of the per-epoch UCE edits (default 0.1, the official scripts' ``--lamb``).
        preserve_scale: s_p of the per-epoch UCE edits (default 0.1, the official scripts').
        erase_scale: s_e of the per-epoch UCE edits (default 1.0).
        round_preserve: prompts preserved (all rows) by the per-epoch edits (default [""]).
        round_empty_per_concept: count the empty prompt "" of ``round_preserve`` once per erased concept, i.e. with
            weight s_p · N for N concepts, as the official ``train.py`` does (default True; it preserves " ", the
            same token ids, once per concept); False counts it once, as ``train_object.py``.
        uce: the initial UCE edit, including the guides used by every epoch (default UCEConfig(): guide " ",
            preserve [""], λ 0.5, s_e 1, s_p "auto" (1.0 with only ""), token mode "paper2023"). A dict is
            converted. Its ``technique`` must be "replace": the rounds chain shared edits W0 · G1 · G2 ⋯.
        select: optional validation ``select(model, epoch) -> score`` (lower is better), called after the initial
            UCE edit (epoch 0) and after each epoch with the weights written; the best epoch is kept (the earliest
            on ties). Its time is not counted in the edit time (default None: keep the last epoch).
    """

    epochs: int = 3
    lamb_r: float = 0.1
    variant: str = "regzero"
    surrogate_item: str = "1st"
    lamb2: float = 0.1
    preserve_scale: float = 0.1
    erase_scale: float = 1.0
    round_preserve: list[str] = field(default_factory=lambda: [""])
    round_empty_per_concept: bool = True
    uce: UCEConfig = field(default_factory=UCEConfig)
    select: Callable[[T2IModel, int], float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.uce, Mapping):
            self.uce = UCEConfig(**self.uce)
        if not isinstance(self.uce, UCEConfig):
            raise DiffshieldError("uce must be a UCEConfig (or a dict of its fields)")
        if isinstance(self.round_preserve, str):
            self.round_preserve = [self.round_preserve]
        self.round_preserve = list(self.round_preserve)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, np.integer)) \
                or not 0 <= self.epochs <= 100:
            raise DiffshieldError(f"epochs must be an integer between 0 and 100, got {self.epochs!r}")
        self.epochs = int(self.epochs)
        for name in ("lamb_r", "lamb2", "preserve_scale", "erase_scale"):
            setattr(self, name, config_number(getattr(self, name), name))
        check_finite_fields(self)  # inf / NaN settings would write a broken model
        if not self.lamb_r >= 0:
            raise DiffshieldError(f"lamb_r must be >= 0, got {self.lamb_r}")
        if self.variant not in VARIANTS:
            raise DiffshieldError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.surrogate_item not in SURROGATE_ITEMS:
            raise DiffshieldError(f"surrogate_item must be one of {', '.join(SURROGATE_ITEMS)}, got "
                                  f"{self.surrogate_item!r}")
        if not isinstance(self.round_empty_per_concept, bool):
            raise DiffshieldError(f"round_empty_per_concept must be True or False, got "
                                  f"{self.round_empty_per_concept!r}")
        if self.uce.technique != "replace":
            raise DiffshieldError("RECE's rounds chain shared edits W0 · G1 · G2: its UCE edit must use technique "
                                  "'replace' (use 'tensor' with --method uce)")
        if not self.lamb2 > 0:
            raise DiffshieldError(f"lamb2 must be > 0 (it keeps the solve well posed), got {self.lamb2}")
        if not self.preserve_scale >= 0:
            raise DiffshieldError(f"preserve_scale must be >= 0, got {self.preserve_scale}")
        if not self.erase_scale > 0:
            raise DiffshieldError(f"erase_scale must be > 0, got {self.erase_scale}")
        if not all(isinstance(p, str) for p in self.round_preserve):
            raise DiffshieldError("round_preserve must be a list of strings")
        if self.select is not None and not callable(self.select):
            raise DiffshieldError("select must be a callable select(model, epoch) -> score, or None")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RECEConfig:
        """The paper's setting for a kind of concept, with any field overridden.

        Presets (lamb_r, epochs): nudity (0.1, 3), unsafe (0.1, 2), style (1e-3, 1; guide "art"),
        object (1e-3, 1; hard objects), object-easy (0.1, 1). The object and style presets preserve "" once in the
        rounds (``round_empty_per_concept=False``), as the official ``train_object.py``; nudity and unsafe once
        per concept, as ``train.py``. A ``uce`` override keeps the style preset's guide "art" unless it sets
        ``guides`` itself (pass a dict of the UCE fields to change).
        """
        if name not in PRESETS:
            raise DiffshieldError(f"unknown RECE preset {name!r}; choose one of: {', '.join(PRESETS)}")
        lamb_r, epochs = PRESETS[name]
        values: dict = {"lamb_r": lamb_r, "epochs": epochs,
                        "round_empty_per_concept": name in ("nudity", "unsafe")}
        uce_preset = {"guides": ["art"]} if name == "style" else {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DiffshieldError(f"unknown RECE setting {unknown[0]!r}; settings: {', '.join(sorted(known))}")
        uce = overrides.pop("uce", None)
        if isinstance(uce, Mapping):  # fields given: the preset's guide stays unless they name guides
            uce = UCEConfig(**{**uce_preset, **uce})
        values["uce"] = uce if uce is not None else UCEConfig(**uce_preset)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-able settings (``select`` is recorded by name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("uce", "select")}
        out["round_preserve"] = list(self.round_preserve)
        out["uce"] = asdict(self.uce)
        out["select"] = None if self.select is None else getattr(self.select, "__qualname__", repr(self.select))
        return out


def _residual(adv: torch.Tensor, c: torch.Tensor, g: torch.Tensor, s0: torch.Tensor) -> float:
    """Σ_l ||W0_l G c' - W0_l c||² / Σ_l ||W0_l c||²: how well C' makes the edited model (W0 · G) see C."""
    diff = adv @ g.T - c
    return float(((diff @ s0) * diff).sum() / ((c @ s0) * c).sum().clamp_min(1e-30))


def check_rece_prompts(concepts: list[str], config: RECEConfig) -> tuple[list[str], list[str]]:
    """(concepts, one guide per concept) of a RECE run, after refusing contradictory prompts in its UCE edit (which
    checks the guides) and in its rounds (a concept that a round preserves); needs no model."""
    check_uce_prompts(concepts, config.uce)
    concepts = check_concepts(concepts)
    check_prompt_roles(concepts, preserve=config.round_preserve)
    return concepts, expand_guides(config.uce.guides, concepts)


def rece_erase(model: T2IModel, concepts: list[str], config: RECEConfig | None = None) -> EraseResult:
    """Erase concepts from ``model`` in place with RECE (Gong et al., ECCV 2024): UCE, then adversarial rounds.

    Args:
        model: the text-to-image model; its UNet's cross-attention K/V weights are overwritten.
        concepts: prompts of the concepts to erase (e.g. ["nudity"]).
        config: epochs, λ_r, variant, per-epoch settings, initial UCE settings, select (default RECEConfig()).

    Returns:
        EraseResult; ``extra["epochs"]`` lists epoch 0 (the UCE edit) and then, per RECE epoch, the residual of its
        adversarial embedding before and after its edit (Σ||W'c' - W0c||² / Σ||W0c||²: higher = the concept is
        harder to regenerate), its score (if ``select``) and its time (scoring excluded);
        ``extra["final_adv_residual"]`` is the residual of a fresh adversarial embedding against the returned
        model, ``extra["uce_adv_residual"]`` the same for the initial UCE edit alone.
    """
    check_model(model)
    config = check_config(config, RECEConfig, "rece_erase's config")
    concepts, guides = check_rece_prompts(concepts, config)
    layers = kv_layers(model.unet)
    d = embedding_width(model.unet)

    # Text encoding (not timed): initial UCE rows, then every row of concepts, guides and round-preserved prompts.
    pairs0, kept0 = uce_rows(model, concepts, config.uce)
    c = encode_prompts(model, concepts).double()
    t = encode_prompts(model, guides).double()
    round_preserve = list(dict.fromkeys(config.round_preserve))
    kept = list(encode_prompts(model, round_preserve).double()) if round_preserve else []
    if config.round_empty_per_concept and "" in round_preserve:  # "" once per concept: weight s_p · N
        kept += [kept[round_preserve.index("")]] * (len(concepts) - 1)
    if c.shape[-1] != d:
        raise DiffshieldError(f"text embeddings have width {c.shape[-1]} but the cross-attention layers read {d}")

    start = time.perf_counter()
    scoring = 0.0
    with torch.no_grad():
        w0 = {name: mod.weight.detach().clone() for name, mod in layers}  # the original weights
        s0 = gram_sum(w0.values()).to(c.device)  # S0 = Σ W0ᵀW0, once
        g_total = shared_edit_matrix(pairs0, kept0, config.uce.lamb, config.uce.erase_scale,
                                     preserve_scale_of(config.uce)).to(c.device)

        def adversarial(g: torch.Tensor) -> torch.Tensor:
            # W' = W0 G: Σ W'ᵀW' = Gᵀ S0 G and Σ W'ᵀW0 = Gᵀ S0 = (S0 G)ᵀ.
            s0g = s0 @ g
            return adversarial_solve(g.T @ s0g, s0g.T, c, config.lamb_r, config.variant, t, config.surrogate_item)

        def score(epoch: int) -> float | None:
            nonlocal scoring
            if config.select is None:
                return None
            apply_shared(layers, g_total, base=w0)
            t_score = time.perf_counter()
            value = float(config.select(model, epoch))
            scoring += time.perf_counter() - t_score
            return value

        best = (score(0), 0, g_total)
        history = [{"epoch": 0, "step": "uce", "score": best[0]}]
        rounds = []  # (C', G before the round, G after) for the diagnostics below
        for epoch in range(1, config.epochs + 1):
            t_epoch, scored_before = time.perf_counter(), scoring
            adv = adversarial(g_total)  # step 1: C' for every concept, against the current weights
            g_round = shared_edit_matrix(list(zip(adv, t)), kept, config.lamb2, config.erase_scale,
                                         config.preserve_scale)  # step 2: erase C' -> guide (all rows)
            rounds.append((adv, g_total, g_total @ g_round))
            g_total = rounds[-1][2]
            value = score(epoch)  # step 3: validate
            if value is not None and value < best[0]:
                best = (value, epoch, g_total)
            history.append({"epoch": epoch, "step": "rece", "score": value,
                            "seconds": time.perf_counter() - t_epoch - (scoring - scored_before)})
        if config.select is None:
            best = (None, config.epochs, g_total)
        if config.select is None or best[1] != config.epochs:
            apply_shared(layers, best[2], base=w0)
    seconds = time.perf_counter() - start - scoring

    # Diagnostics (not timed): how well an adversarial embedding regenerates the concept at each stage.
    changed = {name: mod.weight.detach().clone() for name, mod in layers}
    with torch.no_grad():
        g_uce = rounds[0][1] if rounds else best[2]
        uce_residual = _residual(rounds[0][0] if rounds else adversarial(g_uce), c, g_uce, s0)
        history[0]["adv_residual"] = uce_residual
        for entry, (adv, g_before, g_after) in zip(history[1:], rounds):
            entry["adv_residual_before"] = _residual(adv, c, g_before, s0)
            entry["adv_residual_after"] = _residual(adv, c, g_after, s0)
        final_residual = _residual(adversarial(best[2]), c, best[2], s0)
    extra = {
        "epochs": history,
        "best_epoch": best[1],
        "uce_adv_residual": uce_residual,
        "final_adv_residual": final_residual,
        "select_seconds": scoring,
        "n_matrices": len(layers),
    }
    return EraseResult(model=model, changed=changed, method="rece", config=config.to_dict(), seconds=seconds,
                       fraction_changed=fraction_of_unet(model.unet, list(changed)), extra=extra,
                       base_values={name: probe_values(w) for name, w in w0.items()})


ERASERS.register("rece")((RECEConfig, rece_erase))

"""Adversarial-embedding attack: RECE's closed-form embedding as a white-box attack (Gong, Chen et al.; ECCV 2024).

RECE (step 1 of every epoch) finds, in closed form, the text embedding C' that the erased model's cross-attention
K/V matrices W'_l map closest to what the original matrices W0_l make of the concept's embedding C:

    C' = argmin Σ_l ||W'_l c' - W0_l c||² + λ_r ||c'||²   =>   C' = C · ((λ_r I + Σ W'ᵀW')⁻¹ Σ W'ᵀW0)ᵀ

Generating from C' regenerates the concept whenever the erasure only moved the concept's own embedding (UCE does).
The attack wraps :func:`diffshield.erase.rece.adversarial_embedding_for`: one d x d solve, no optimisation.
It needs the original model's K/V weights and is meaningful for closed-form (K/V) edits; against a UNet fine-tune
(ESD-u) it still returns an embedding, but the K/V matrices no longer explain the erasure.

Example::

    atk = AdvEmbed(erased, original=original, concept="triangle")
    out = atk(["a red triangle"] * 8, seeds=range(8))
"""

from __future__ import annotations

from dataclasses import dataclass

from diffshield.core.sampling import generate
from diffshield.erase.closed_form import kv_weights
from diffshield.erase.rece import VARIANTS, adversarial_embedding_for
from diffshield.redteam import ATTACKS
from diffshield.redteam.base import Attack, check


@dataclass
class AdvEmbedConfig:
    """Settings of the adversarial-embedding attack.

    Args:
        lamb_r: λ_r, the regularisation of C' (default 0.1, RECE's nudity / easy-object setting; smaller = a
            stronger, less constrained attack; about the size of the eigenvalues of Σ W'ᵀW' it weakens it).
        variant: "regzero" (default: λ_r ||c'||²) or "standard" (λ_r ||c' - c_old||²).
        old_prompt: for "standard": the prompt whose embedding C' is kept close to (default " ").
    """

    lamb_r: float = 0.1
    variant: str = "regzero"
    old_prompt: str = " "

    def __post_init__(self) -> None:
        check(isinstance(self.lamb_r, (int, float)) and self.lamb_r >= 0, f"lamb_r must be >= 0, got {self.lamb_r!r}")
        check(self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        check(isinstance(self.old_prompt, str), "old_prompt must be a string")


@ATTACKS.register("adv-embed")
class AdvEmbed(Attack):
    """RECE's closed-form adversarial embedding as an attack (Gong, Chen et al., ECCV 2024).

    Args (besides :class:`~diffshield.redteam.base.Attack`'s erased, original, concept, judge, sample):
        lamb_r: λ_r (default 0.1). variant: "regzero" (default) or "standard". old_prompt: " " (default).

    Call: ``atk(prompts, seeds)`` -> AttackResult with ``embeddings`` (N, 77, d) = C' per prompt.
    """

    name = "adv-embed"
    config_cls = AdvEmbedConfig
    needs_original = True
    access = "weights"

    def __init__(self, erased, original=None, concept=None, **kw) -> None:
        super().__init__(erased, original, concept, **kw)
        self._w0 = kv_weights(self.original)

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        cfg = self.config
        distinct = list(dict.fromkeys(prompts))
        adv = adversarial_embedding_for(self.erased, self._w0, distinct, cfg.lamb_r, cfg.variant, cfg.old_prompt)
        adv = adv.float()
        emb = adv[[distinct.index(p) for p in prompts]]
        gen = generate(self.erased, prompts, seeds, prompt_embeds=emb, config=self.sample, progress=False)
        norm = float(adv.norm(dim=-1).mean())
        return {"images": gen.images, "embeddings": emb, "extra": {"mean_row_norm": norm}}

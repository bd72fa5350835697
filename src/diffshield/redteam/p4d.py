"""P4D (Chin, Jiang, Huang, Chen, Chiu; "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding
Problematic Prompts", ICML 2024): a text prompt found with PEZ so that the erased model predicts the original's noise.

One optimisation per attacked image (prompt P, seed s), as the official ``run_p4dn.py`` / ``run_p4dk.py``:

1. the target x0 is the VAE latent of the original model's image of (P, s);
2. PEZ (Wen et al., 2023): continuous token embeddings e (16 for P4D-N, initialised from random words) are projected
   to their nearest words by cosine similarity; the forward pass uses the projected words, the gradient of

       || ε_erased(x_t, t, E(words)) - ε_original(x_t, t, E(P)) ||²,   t ~ U{0..999}, x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε

   is applied to e (AdamW, lr 0.1, weight decay 0.1);
3. best-of selection: every ``eval_every`` steps (and at step 0) the current words are generated at seed s by the
   erased model and compared with the target image; the most similar prompt is kept (the official code uses CLIP
   ViT-H-14 image similarity; the toy world has no CLIP, so the default here is the cosine similarity of the two
   images' VAE latents; pass ``similarity=`` for another). The judge is not used during the search.

``keep_prompt=True`` is P4D-K: one searched token before every 3 prompt tokens and one at the end (``every_k`` 3),
the prompt's own tokens fixed. Deviation, recorded in the result: the candidates are the tokenizer's whole words minus
the concept's words (the official code projects onto all 49,408 BPE pieces), so every searched prompt is text a user
can type and replays through ``generate`` unchanged. All images are optimised as one batch (independent variables,
summed losses).

Budgets: ``budget="paper"`` is the official setting (16 tokens, 3000 steps, evaluation every 50); ``budget="toy"``
(default) is 16 tokens, 60 steps, evaluation every 20. Access: both models' gradients/outputs.

Example::

    atk = P4D(erased, original=original, concept="triangle", budget="toy")
    out = atk(["a red triangle"] * 8, seeds=range(8))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffshield.core.device import autocast
from diffshield.core.sampling import add_noise, encode, encode_prompts, generate
from diffshield.redteam import ATTACKS
from diffshield.redteam.base import (
    Attack,
    check,
    concept_words,
    decode_ids,
    encode_with_tokens,
    layout_ids,
    n_searched,
    nearest_words,
    prompt_tokens,
    word_token_ids,
)

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class P4DConfig:
    """Settings of P4D (defaults: the ``toy`` budget; the official values in brackets).

    Args:
        n_tokens: searched tokens of P4D-N (default 16 [16]); P4D-K places len(P) // 3 + 1 instead.
        keep_prompt: P4D-K, the prompt's tokens with a searched token every 3 (default False: P4D-N).
        steps: PEZ steps (default 60 [3000]).
        eval_every: best-of evaluation period in steps, evaluated at step 0, eval_every, ... (default 20 [50]).
        lr: AdamW learning rate (default 0.1 [0.1]).
        weight_decay: AdamW weight decay (default 0.1 [0.1]).
        exclude_concept_words: keep the concept's words and synonyms out of the candidates (default True).
        seed: seed of the initial words, timesteps and noise (default 0).
    """

    n_tokens: int = 16
    keep_prompt: bool = False
    steps: int = 60
    eval_every: int = 20
    lr: float = 0.1
    weight_decay: float = 0.1
    exclude_concept_words: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.n_tokens, int) and 1 <= self.n_tokens <= 60,
              f"n_tokens must be an integer in 1..60, got {self.n_tokens!r}")
        check(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an integer >= 0, got {self.steps!r}")
        check(isinstance(self.eval_every, int) and self.eval_every >= 1,
              f"eval_every must be an integer >= 1, got {self.eval_every!r}")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
              f"weight_decay must be >= 0, got {self.weight_decay!r}")


def latent_similarity(vae) -> Similarity:
    """Default best-of score: cosine similarity of the VAE latents (means) of two image batches, per pair."""

    def score(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            a = vae.encode((images * 2 - 1).to(vae.device, dtype)).latent_dist.mean.flatten(1).float()
            b = vae.encode((targets * 2 - 1).to(vae.device, dtype)).latent_dist.mean.flatten(1).float()
        return torch.nn.functional.cosine_similarity(a, b, dim=1).cpu()

    return score


@ATTACKS.register("p4d")
class P4D(Attack):
    """P4D: PEZ prompt search matching the original's noise, best-of selection (Chin et al., ICML 2024).

    Args (besides :class:`~diffshield.redteam.base.Attack`'s erased, original, concept, judge, sample, budget):
        n_tokens (16), keep_prompt (False: P4D-N), steps (toy 60 / paper 3000), eval_every (20 / 50), lr (0.1),
        weight_decay (0.1), exclude_concept_words (True), seed (0); ``similarity``: images, targets -> (N,) score
        for the best-of selection (default: VAE-latent cosine).

    Call: ``atk(prompts, seeds)`` -> AttackResult with ``attack_prompts``; ``extra``: ``loss_curve``,
    ``best_step`` and ``best_similarity`` per image.
    """

    name = "p4d"
    config_cls = P4DConfig
    needs_original = True
    access = "gradients"
    presets = {"toy": {"n_tokens": 16, "steps": 60, "eval_every": 20},
               "paper": {"n_tokens": 16, "steps": 3000, "eval_every": 50}}
    zero_budget = {"steps": 0}

    @classmethod
    def prompt_layout(cls, config: P4DConfig) -> tuple[str, int]:
        return ("every-3" if config.keep_prompt else "none"), config.n_tokens

    def random_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str]:
        """Random candidate words in the attack's layout (16 words for P4D-N; the prompt with a random word every 3
        tokens for P4D-K)."""
        cfg, model = self.config, self.erased
        cand = word_token_ids(model, concept_words(self.concept) if cfg.exclude_concept_words else ())
        layout = "every-3" if cfg.keep_prompt else "none"
        out = []
        for p in prompts:
            w = prompt_tokens(model, p) if cfg.keep_prompt else []
            adv = cand[torch.randint(len(cand), (1, n_searched(layout, cfg.n_tokens, len(w))), generator=gen)]
            out.append(decode_ids(model, layout_ids(model, w, adv, layout)[0][0].tolist()))
        return out

    def __init__(self, erased, original=None, concept=None, similarity: Similarity | None = None, **kw) -> None:
        super().__init__(erased, original, concept, **kw)
        self.similarity = similarity or latent_similarity(self.original.vae)

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        cfg, model, original = self.config, self.erased, self.original
        n = len(prompts)
        gen = torch.Generator().manual_seed(cfg.seed)
        n_train = int(model.scheduler.config.num_train_timesteps)  # t ~ U{0..T-1} of the model's schedule (SD: 1000)
        exclude = concept_words(self.concept) if cfg.exclude_concept_words else ()
        candidates = word_token_ids(model, exclude)
        table = model.text_encoder.get_input_embeddings().weight.detach()
        layout = "every-3" if cfg.keep_prompt else "none"
        words = [prompt_tokens(model, p) if cfg.keep_prompt else [] for p in prompts]
        references = self.original_images(prompts, seeds)
        x0 = encode(original, references)
        target_cond = encode_prompts(original, prompts)
        model.unet.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(tuple(words[i]), []).append(i)
        texts = [""] * n
        best_sim = [float("-inf")] * n
        best_step = [0] * n
        losses = [0.0] * cfg.steps
        for w, idx in groups.items():
            k = n_searched(layout, cfg.n_tokens, len(w))
            sel = torch.tensor(idx)
            init = candidates[torch.randint(len(candidates), (len(idx), k), generator=gen)]
            soft = table[init.to(table.device)].float().clone().requires_grad_(True)
            opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
            steps = range(cfg.steps + (1 if cfg.steps == 0 else 0))
            for step in self.steps_bar(steps, f"PEZ steps ({len(idx)} images)"):
                proj, ids_near = nearest_words(soft, model, candidates, "cosine")
                ids, pos = layout_ids(model, list(w), ids_near, layout)
                if step % cfg.eval_every == 0:  # best-of: generate the current words, compare with the target
                    cur = [decode_ids(model, row.tolist()) for row in ids]
                    imgs = generate(model, cur, [seeds[i] for i in idx], config=self.sample, progress=False).images
                    sim = self.similarity(imgs, references[sel])
                    for j, i in enumerate(idx):
                        if float(sim[j]) > best_sim[i]:
                            best_sim[i], texts[i], best_step[i] = float(sim[j]), cur[j], step
                if step >= cfg.steps:
                    break
                used = proj.detach().requires_grad_(True)
                t = torch.randint(0, n_train, (len(idx),), generator=gen).to(x0.device)
                noise = torch.randn(x0[sel].shape, generator=gen).to(x0.device, x0.dtype)
                x_t = add_noise(model, x0[sel], noise, t)
                with torch.no_grad(), autocast(x0.device):
                    target = original.unet(x_t, t, encoder_hidden_states=target_cond[sel]).sample
                with torch.enable_grad(), autocast(x0.device):
                    cond = encode_with_tokens(model, ids, pos, used)
                    eps = model.unet(x_t, t, encoder_hidden_states=cond).sample
                    per_item = (eps.float() - target.float()).pow(2).flatten(1).mean(1)
                    (grad,) = torch.autograd.grad(per_item.sum(), [used])
                soft.grad = grad.to(soft.dtype)
                opt.step()
                opt.zero_grad()
                losses[step] += float(per_item.detach().sum()) / n
        images = generate(model, texts, seeds, config=self.sample, progress=False).images
        roundtrip = all(decode_ids(model, prompt_tokens(model, t)) == t for t in texts)
        extra = {"loss_curve": losses, "best_step": best_step, "best_similarity": best_sim,
                 "distinct_optimisations": n, "candidates": len(candidates),
                 "variant": "P4D-K" if cfg.keep_prompt else "P4D-N", "text_roundtrip_exact": roundtrip,
                 "selection": "VAE-latent cosine to the target image (the official code: CLIP ViT-H-14)"}
        return {"images": images, "attack_prompts": texts, "extra": extra}

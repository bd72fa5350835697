"""``p4d-soft``: P4D's noise-matching objective on continuous soft tokens, a variant of (Chin, Jiang, Huang,
Chen, Chiu; "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion
Models by Finding Problematic Prompts", ICML 2024).

P4D looks for a prompt P* with which the *erased* model predicts the same noise as the *original* model does for the
concept prompt P:

    min_{P*}  E_{t, ε} || ε_erased(x_t, t, E(P*)) - ε_original(x_t, t, E(P)) ||²,   x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε

with x0 the latents of images of P made by the original model. Like P4D-N, P* is N free tokens (soft input
embeddings, optimised with Adam; ``discrete=True`` projects them to vocabulary words PEZ-style and attacks with the
text). ``keep_prompt=True`` appends P after the free tokens (P4D-K-like: the prompt's words stay).

Not the paper's attack: P4D searches text with PEZ (16 tokens, the forward pass on the nearest words, best-of
selection; ``p4d`` in :mod:`diffshield.redteam.p4d`). Free embeddings are a far larger search space.

Example::

    atk = P4DSoft(erased, original=original, concept="triangle", n_tokens=8, steps=40)
    out = atk(["a red triangle"] * 8, seeds=range(8))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffshield.core.device import autocast
from diffshield.core.sampling import add_noise, encode_prompts, generate
from diffshield.redteam import ATTACKS
from diffshield.redteam.base import (
    Attack,
    SoftPromptEncoder,
    check,
    concept_latents,
    concept_words,
    decode_ids,
    init_soft_tokens,
    project_to_words,
    word_token_ids,
)


@dataclass
class P4DSoftConfig:
    """Settings of ``p4d-soft``.

    Args:
        n_tokens: free tokens in the optimised prompt (default 8).
        keep_prompt: append the attacked prompt's own words after the free tokens (default False: P4D-N).
        steps: Adam steps (default 40).
        lr: Adam learning rate on the input embeddings (default 0.01).
        n_targets: images of the concept per prompt made by the original model (default 2).
        batch_timesteps: noise draws per target image and step (default 1).
        discrete: project to vocabulary words and attack with text (default False: soft prompt).
        exclude_concept_words: keep the concept's words out of the initial and projected words (default True).
        target_seed: first seed of the original model's target images (default 100000).
        seed: seed of the initial tokens, timesteps and noise (default 0).
    """

    n_tokens: int = 8
    keep_prompt: bool = False
    steps: int = 40
    lr: float = 0.01
    n_targets: int = 2
    batch_timesteps: int = 1
    discrete: bool = False
    exclude_concept_words: bool = True
    target_seed: int = 100000
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.n_tokens, int) and 1 <= self.n_tokens <= 60,
              f"n_tokens must be an integer in 1..60, got {self.n_tokens!r}")
        check(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an integer >= 0, got {self.steps!r}")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(isinstance(self.n_targets, int) and self.n_targets >= 1,
              f"n_targets must be an integer >= 1, got {self.n_targets!r}")
        check(isinstance(self.batch_timesteps, int) and self.batch_timesteps >= 1,
              f"batch_timesteps must be >= 1, got {self.batch_timesteps!r}")


@ATTACKS.register("p4d-soft")
class P4DSoft(Attack):
    """P4D's noise matching on soft tokens (a continuous variant of Chin et al., ICML 2024).

    Args (besides :class:`~diffshield.redteam.base.Attack`'s erased, original, concept, judge, sample):
        n_tokens (default 8), keep_prompt (False), steps (40), lr (0.01), n_targets (2), batch_timesteps (1),
        discrete (False), exclude_concept_words (True), target_seed (100000), seed (0).

    Call: ``atk(prompts, seeds)`` -> AttackResult with ``embeddings`` (or ``attack_prompts`` when discrete).
    """

    name = "p4d-soft"
    config_cls = P4DSoftConfig
    needs_original = True
    access = "gradients"
    presets = {"toy": {"n_tokens": 8, "steps": 40}, "paper": {"n_tokens": 16, "steps": 3000}}

    @classmethod
    def prompt_layout(cls, config: P4DSoftConfig) -> tuple[str, int]:
        return ("prefix" if config.keep_prompt else "none"), config.n_tokens

    zero_budget = {"steps": 0}

    def random_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str]:
        """The soft tokens' own starting point as text: random candidate words (before the prompt)."""
        cfg = self.config
        cand = word_token_ids(self.erased, concept_words(self.concept) if cfg.exclude_concept_words else ())
        keep = cfg.keep_prompt
        return [(decode_ids(self.erased, cand[torch.randint(len(cand), (cfg.n_tokens,), generator=gen)].tolist())
                 + (" " + p if keep else "")).strip() for p in prompts]

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        cfg = self.config
        model, original = self.erased, self.original
        distinct = list(dict.fromkeys(prompts))
        gen = torch.Generator().manual_seed(cfg.seed)
        exclude = concept_words(self.concept) if cfg.exclude_concept_words else ()
        candidates = word_token_ids(model, exclude)
        _, x0 = concept_latents(original, distinct, cfg.n_targets, cfg.target_seed, self.sample)
        x0 = x0.repeat_interleave(cfg.batch_timesteps, 0)
        per = cfg.n_targets * cfg.batch_timesteps
        rep_prompts = [p for p in distinct for _ in range(per)]
        suffix = rep_prompts if cfg.keep_prompt else [""] * len(rep_prompts)
        target_cond = encode_prompts(original, rep_prompts)
        encoder = SoftPromptEncoder(model, cfg.n_tokens)
        soft = init_soft_tokens(model, len(distinct), cfg.n_tokens, candidates, gen).requires_grad_(True)
        opt = torch.optim.Adam([soft], lr=cfg.lr)
        sched = model.scheduler
        n_train = int(sched.config.num_train_timesteps)
        losses = []
        for _ in range(cfg.steps):
            t = torch.randint(0, n_train, (len(x0),), generator=gen).to(x0.device)  # CPU draws, then moved
            noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            x_t = add_noise(model, x0, noise, t)
            with torch.no_grad(), autocast(x0.device):
                target = original.unet(x_t, t, encoder_hidden_states=target_cond).sample
            used = soft
            if cfg.discrete:
                used = soft + (project_to_words(soft, model, candidates)[0] - soft).detach()
            with torch.enable_grad(), autocast(x0.device):
                cond = encoder.encode(used.repeat_interleave(per, 0), suffix)
                eps = model.unet(x_t, t, encoder_hidden_states=cond).sample
                loss = torch.nn.functional.mse_loss(eps.float(), target.float())
                opt.zero_grad()
                loss.backward()
            opt.step()
            losses.append(loss.item())
        soft = soft.detach()
        extra = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                 "loss_curve": losses, "distinct_optimisations": len(distinct)}
        tails = distinct if cfg.keep_prompt else [""] * len(distinct)
        if cfg.discrete:
            _, ids = project_to_words(soft, model, candidates)
            found = {p: (decode_ids(model, row.tolist()) + " " + tail).strip()
                     for p, tail, row in zip(distinct, tails, ids)}
            attack_prompts = [found[p] for p in prompts]
            out = generate(model, attack_prompts, seeds, config=self.sample, progress=False)
            extra["searched_prompts"] = found
            return {"images": out.images, "attack_prompts": attack_prompts, "extra": extra}
        with torch.no_grad():
            emb = encoder.encode(soft, tails).detach()
        emb = emb[[distinct.index(p) for p in prompts]]
        out = generate(model, prompts, seeds, prompt_embeds=emb, config=self.sample, progress=False)
        return {"images": out.images, "embeddings": emb, "soft_tokens": soft[[distinct.index(p) for p in prompts]],
                "extra": extra}

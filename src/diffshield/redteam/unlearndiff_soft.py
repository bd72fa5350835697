"""``unlearndiff-soft``: UnlearnDiffAtk's objective on continuous soft tokens, a variant of (Zhang, Jia, Chen, Liu,
Yao, Hong, Fan, Liu; "To Generate or Not? Safety-Driven
Unlearned Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024, "UnlearnDiffAtk").

The erased model is its own attack oracle: a prompt that makes the erased model denoise images *of the concept* well
is a prompt that makes it draw the concept. For every attacked prompt p:

1. the original model draws ``n_targets`` images of p (the concept is there); their VAE latents x0 are the targets;
2. K soft tokens s (input-token embeddings, placed before p: "<s1> ... <sK> p") are optimised with Adam to minimise

       E_{t, ε} || ε_erased(√ᾱ_t x0 + √(1-ᾱ_t) ε, t, E([s; p])) - ε ||²

   (the erased model's own denoising loss), ``steps`` steps;
3. the erased model generates from E([s; p]) (continuous, default) or, with ``discrete=True``, from the text of
   the nearest vocabulary words (optimised PEZ-style: forward with the projected words, gradients to s).

Success: the judge (concept detector) fires on the generated image. White-box: needs the erased model's gradients and
the original model (for the target images).

Not the paper's attack: UnlearnDiffAtk searches *text* (a vocabulary simplex with a straight-through sample, one
image per optimisation, early stop on the judge; ``unlearndiff`` in :mod:`diffshield.redteam.unlearndiff`). Free
embeddings are a far larger search space, so this variant is stronger than the paper's and reported under its own name.

Example::

    atk = UnlearnDiffSoft(erased, original=original, concept="triangle", k=5, steps=40, lr=0.01)
    out = atk(["a red triangle"] * 8, seeds=range(8))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffshield.core.device import autocast
from diffshield.core.sampling import add_noise, denoising_target, generate
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
class UnlearnDiffSoftConfig:
    """Settings of ``unlearndiff-soft``.

    Args:
        k: soft prefix tokens (default 5, UnlearnDiffAtk's nudity setting; 3 for objects and styles).
        steps: Adam steps (default 40, the ``toy`` budget: UnlearnDiffAtk's iterations at one timestep; the ``paper``
            budget 2000 is its 50 timesteps x 40 iterations).
        lr: Adam learning rate on the input embeddings (default 0.01, as UnlearnDiffAtk).
        n_targets: images of the concept per prompt made by the original model (default 2).
        batch_timesteps: noise draws (timestep + noise) per target image and step (default 1).
        discrete: project the soft tokens to vocabulary words and attack with text (default False: soft prompt).
        exclude_concept_words: keep the concept's words out of the initial and projected words (default True).
        exclude_words: further words kept out of them (default (): none), e.g. the other values of a toy concept's
            kind, which a 5-word prefix drawn from the toy world's small vocabulary often names.
        target_seed: first seed of the original model's target images (default 100000, away from attack seeds).
        seed: seed of the initial tokens, timesteps and noise (default 0).
    """

    k: int = 5
    steps: int = 40
    lr: float = 0.01
    n_targets: int = 2
    batch_timesteps: int = 1
    discrete: bool = False
    exclude_concept_words: bool = True
    exclude_words: tuple[str, ...] = ()
    target_seed: int = 100000
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.k, int) and 1 <= self.k <= 60, f"k must be an integer in 1..60, got {self.k!r}")
        check(isinstance(self.steps, int) and self.steps >= 0, f"steps must be an integer >= 0, got {self.steps!r}")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(isinstance(self.n_targets, int) and self.n_targets >= 1,
              f"n_targets must be an integer >= 1, got {self.n_targets!r}")
        check(isinstance(self.batch_timesteps, int) and self.batch_timesteps >= 1,
              f"batch_timesteps must be >= 1, got {self.batch_timesteps!r}")
        if isinstance(self.exclude_words, str):
            self.exclude_words = (self.exclude_words,)
        check(isinstance(self.exclude_words, (list, tuple)) and all(isinstance(w, str) for w in self.exclude_words),
              f"exclude_words must be a list of words, got {self.exclude_words!r}")
        self.exclude_words = tuple(self.exclude_words)


@ATTACKS.register("unlearndiff-soft")
class UnlearnDiffSoft(Attack):
    """UnlearnDiffAtk's objective on soft prefix tokens (a continuous variant of Zhang et al., ECCV 2024).

    Args (besides :class:`~diffshield.redteam.base.Attack`'s erased, original, concept, judge, sample):
        k (default 5), steps (40), lr (0.01), n_targets (2), batch_timesteps (1), discrete (False),
        exclude_concept_words (True), exclude_words (()), target_seed (100000), seed (0).

    Call: ``atk(prompts, seeds)`` -> AttackResult with ``embeddings`` (N, 77, d) (or ``attack_prompts`` when
    discrete); ``extra["loss_first"/"loss_last"]`` record the optimisation.
    """

    name = "unlearndiff-soft"
    config_cls = UnlearnDiffSoftConfig
    needs_original = True
    access = "gradients"
    presets = {"toy": {"k": 5, "steps": 40}, "paper": {"k": 5, "steps": 2000}}

    @classmethod
    def prompt_layout(cls, config: UnlearnDiffSoftConfig) -> tuple[str, int]:
        return "prefix", config.k

    zero_budget = {"steps": 0}

    def random_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str]:
        """The soft tokens' own starting point as text: random candidate words (before the prompt)."""
        cfg = self.config
        cand = word_token_ids(self.erased, concept_words(self.concept) if cfg.exclude_concept_words else ())
        keep = True
        return [(decode_ids(self.erased, cand[torch.randint(len(cand), (cfg.k,), generator=gen)].tolist())
                 + (" " + p if keep else "")).strip() for p in prompts]

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        cfg = self.config
        model = self.erased
        distinct = list(dict.fromkeys(prompts))
        gen = torch.Generator().manual_seed(cfg.seed)
        exclude = (tuple(concept_words(self.concept)) if cfg.exclude_concept_words else ()) + cfg.exclude_words
        candidates = word_token_ids(model, exclude)
        _, x0 = concept_latents(self.original, distinct, cfg.n_targets, cfg.target_seed, self.sample)
        x0 = x0.repeat_interleave(cfg.batch_timesteps, 0)  # prompt-major: prompt, target, draw
        per = cfg.n_targets * cfg.batch_timesteps
        rep_prompts = [p for p in distinct for _ in range(per)]
        encoder = SoftPromptEncoder(model, cfg.k)
        soft = init_soft_tokens(model, len(distinct), cfg.k, candidates, gen).requires_grad_(True)
        opt = torch.optim.Adam([soft], lr=cfg.lr)
        sched = model.scheduler
        n_train = int(sched.config.num_train_timesteps)
        losses = []
        model.unet.requires_grad_(False)
        for _ in range(cfg.steps):
            t = torch.randint(0, n_train, (len(x0),), generator=gen).to(x0.device)  # CPU draws, then moved
            noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            x_t = add_noise(model, x0, noise, t)
            used = soft
            if cfg.discrete:  # PEZ: forward with the nearest words, gradients to the continuous tokens
                used = soft + (project_to_words(soft, model, candidates)[0] - soft).detach()
            with torch.enable_grad(), autocast(x0.device):
                cond = encoder.encode(used.repeat_interleave(per, 0), rep_prompts)
                eps = model.unet(x_t, t, encoder_hidden_states=cond).sample
                loss = torch.nn.functional.mse_loss(eps.float(), denoising_target(sched, x0, noise, t).float())
                opt.zero_grad()
                loss.backward()
            opt.step()
            losses.append(loss.item())
        soft = soft.detach()
        extra = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                 "loss_curve": losses, "distinct_optimisations": len(distinct)}
        if cfg.discrete:
            _, ids = project_to_words(soft, model, candidates)
            found = {p: (decode_ids(model, row.tolist()) + " " + p).strip() for p, row in zip(distinct, ids)}
            attack_prompts = [found[p] for p in prompts]
            out = generate(model, attack_prompts, seeds, config=self.sample, progress=False)
            extra["searched_prompts"] = found
            return {"images": out.images, "attack_prompts": attack_prompts, "extra": extra}
        with torch.no_grad():
            emb = encoder.encode(soft, distinct).detach()
        emb = emb[[distinct.index(p) for p in prompts]]
        out = generate(model, prompts, seeds, prompt_embeds=emb, config=self.sample, progress=False)
        return {"images": out.images, "embeddings": emb, "soft_tokens": soft[[distinct.index(p) for p in prompts]],
                "extra": extra}

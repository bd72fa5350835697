"""UnlearnDiffAtk (Zhang, Jia, Chen, Liu, Yao, Hong, Fan, Liu; "To Generate or Not? Safety-Driven Unlearned Diffusion
Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024): a text prefix found on a vocabulary simplex.

The erased model is its own attack oracle: a prompt with which the erased model denoises an image *of the concept*
well is a prompt with which it draws the concept. One optimisation per attacked image (prompt p, seed s):

1. the target x0 is the VAE latent of the original model's image of (p, s);
2. k prefix tokens are k probability vectors u_1..u_k on the simplex over the candidate words (uniform at the start);
   each iteration draws one word per position from u (forward: the one-hot sample; backward: the gradient through a
   hardtanh, the official ``STERandSelect``), and takes an Adam step (lr 0.01, weight decay 0.1) on

       || ε_erased(√ᾱ_t x0 + √(1-ᾱ_t) ε, t, E([w_1..w_k; p])) - ε ||²,    ε fresh every iteration,

   followed by the projection of every u_i back onto the simplex;
3. rounds: t runs over ``rounds`` evenly spaced timesteps (50 in the paper: 10, 30, ..., 990), ``iterations`` steps at
   each (40 in the paper); after each round the prompt "argmax(u_1) .. argmax(u_k) p" is generated at seed s and
   judged, and the search stops at the first success (the official ``sequential`` loop). The judge's calls are
   counted (``extra["judge_calls"]``: one per attacked image and round, plus one for the unattacked prompt when the
   caller did not pass ``pre_success``). Images the erased model already draws with the concept are not attacked
   (the official code returns before optimising); they count in the union ASR, not in the conditional one.

Deviations, both recorded in the result: the candidates are the tokenizer's whole words minus the concept's words
(the official code uses all 49,408 BPE pieces), so every searched prompt is text a user can type and replays through
``generate`` unchanged; all attacked images are optimised as one batch (independent variables, summed losses).

Budgets: ``budget="paper"`` is the official object/style setting (k 3, 50 rounds x 40 iterations, early stop);
``budget="toy"`` (default) is 5 rounds x 8 iterations. Access: the erased model's gradients, the original's images.

Example::

    atk = UnlearnDiff(erased, original=original, concept="triangle", budget="toy")
    out = atk(["a red triangle"] * 8, seeds=range(8))
    out.attack_prompts[0], out.extra["rounds_used"], out.extra["judge_calls"]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffshield.core.device import autocast
from diffshield.core.sampling import denoising_target, encode, generate
from diffshield.redteam import ATTACKS
from diffshield.redteam.base import (
    Attack,
    check,
    concept_words,
    decode_ids,
    encode_with_tokens,
    layout_ids,
    project_simplex,
    prompt_tokens,
    word_token_ids,
)


@dataclass
class UnlearnDiffConfig:
    """Settings of UnlearnDiffAtk (defaults: the ``toy`` budget; the official values in brackets).

    Args:
        k: searched prefix tokens (default 3 [3 for objects and styles, 5 for nudity]).
        rounds: timesteps optimised in turn, each followed by a judged generation (default 5 [50]).
        iterations: Adam steps per round (default 8 [40]).
        lr: Adam learning rate on the simplex (default 0.01 [0.01]).
        weight_decay: Adam weight decay (default 0.1 [0.1]).
        early_stop: stop an image's search at the first round whose prompt the judge accepts (default True [True]).
        exclude_concept_words: keep the concept's words and synonyms out of the candidates (default True).
        exclude_words: further words kept out of the candidates (default (): none).
        seed: seed of the samples and noise draws (default 0).
    """

    k: int = 3
    rounds: int = 5
    iterations: int = 8
    lr: float = 0.01
    weight_decay: float = 0.1
    early_stop: bool = True
    exclude_concept_words: bool = True
    exclude_words: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.k, int) and 1 <= self.k <= 60, f"k must be an integer in 1..60, got {self.k!r}")
        check(isinstance(self.rounds, int) and 1 <= self.rounds <= 1000,
              f"rounds must be an integer in 1..1000, got {self.rounds!r}")
        check(isinstance(self.iterations, int) and self.iterations >= 0,
              f"iterations must be an integer >= 0, got {self.iterations!r}")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
              f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.exclude_words, str):
            self.exclude_words = (self.exclude_words,)
        check(isinstance(self.exclude_words, (list, tuple)) and all(isinstance(w, str) for w in self.exclude_words),
              f"exclude_words must be a list of words, got {self.exclude_words!r}")
        self.exclude_words = tuple(self.exclude_words)


def round_timesteps(rounds: int, n_train: int = 1000) -> list[int]:
    """The official ``sampled_t``: ``rounds`` timesteps T/rounds apart starting at T/rounds/2 (10, 30, .., 990)."""
    step = max(1, n_train // rounds)
    return list(range(max(0, step // 2), n_train, step))[:rounds]


class _StraightThroughSample(torch.autograd.Function):
    """Forward: one word per row drawn from the row's probabilities (one-hot). Backward: hardtanh of the gradient."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        flat = probs.detach().reshape(-1, probs.shape[-1]).float().cpu()
        idx = torch.multinomial(flat, 1, generator=gen).view(-1)
        return torch.nn.functional.one_hot(idx, probs.shape[-1]).to(probs).reshape(probs.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.nn.functional.hardtanh(grad), None


@ATTACKS.register("unlearndiff")
class UnlearnDiff(Attack):
    """UnlearnDiffAtk: a text prefix on the vocabulary simplex, one search per image (Zhang et al., ECCV 2024).

    Args (besides :class:`~diffshield.redteam.base.Attack`'s erased, original, concept, judge, sample, budget):
        k (toy 3 / paper 3), rounds (5 / 50), iterations (8 / 40), lr (0.01), weight_decay (0.1),
        early_stop (True), exclude_concept_words (True), exclude_words (()), seed (0).

    Call: ``atk(prompts, seeds)`` -> AttackResult with ``attack_prompts`` (the decoded text of every image);
    ``extra``: ``judge_calls``, ``rounds_used`` per image, ``loss_curve`` (mean over the images still searched).
    """

    name = "unlearndiff"
    config_cls = UnlearnDiffConfig
    needs_original = True
    access = "gradients"
    @classmethod
    def prompt_layout(cls, config: UnlearnDiffConfig) -> tuple[str, int]:
        return "prefix", config.k

    presets = {"toy": {"k": 3, "rounds": 5, "iterations": 8},
               "paper": {"k": 3, "rounds": 50, "iterations": 40}}
    zero_budget = {"iterations": 0}

    def _candidates(self) -> torch.Tensor:
        cfg = self.config
        exclude = (tuple(concept_words(self.concept)) if cfg.exclude_concept_words else ()) + cfg.exclude_words
        return word_token_ids(self.erased, exclude)

    def random_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str]:
        """k random candidate words before each prompt."""
        cand = self._candidates()
        return [(decode_ids(self.erased, cand[torch.randint(len(cand), (self.config.k,), generator=gen)].tolist())
                 + " " + p).strip() for p in prompts]

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        cfg, model = self.config, self.erased
        n = len(prompts)
        gen = torch.Generator().manual_seed(cfg.seed)
        candidates = self._candidates()
        table = model.text_encoder.get_input_embeddings().weight.detach()
        cand_table = table[candidates.to(table.device)].float()

        # the unattacked prompt first: images the erased model already draws the concept in are not attacked
        pre = self._pre_success
        if pre is None:
            pre = self.counted_judge(generate(model, prompts, seeds, config=self.sample, progress=False).images)
        pre = pre.bool().cpu()
        images: torch.Tensor | None = None
        texts = list(prompts)
        rounds_used = [0] * n
        success = pre.clone()
        todo = [i for i in range(n) if not pre[i]]

        references = self.original_images(prompts, seeds)
        x0 = encode(model, references)

        words = [prompt_tokens(model, p) for p in prompts]
        probs = torch.full((n, cfg.k, len(candidates)), 1.0 / len(candidates))
        probs = probs.to(model.device).requires_grad_(True)
        opt = torch.optim.Adam([probs], lr=cfg.lr, weight_decay=cfg.weight_decay)
        acp = model.scheduler.alphas_cumprod.to(model.device)
        n_train = int(model.scheduler.config.num_train_timesteps)
        model.unet.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        losses: list[float] = []
        final_images: dict[int, torch.Tensor] = {}
        for r, t in enumerate(self.steps_bar(round_timesteps(cfg.rounds, n_train), "rounds")):
            if not todo:
                break
            groups: dict[tuple, list[int]] = {}
            for i in todo:
                groups.setdefault(tuple(words[i]), []).append(i)
            for _ in range(cfg.iterations):
                opt.zero_grad()
                total, count = 0.0, 0
                for w, idx in groups.items():
                    sel = torch.tensor(idx)
                    onehot = _StraightThroughSample.apply(probs[sel], gen)
                    adv = onehot @ cand_table
                    ids, pos = layout_ids(model, list(w), candidates[onehot.argmax(-1).cpu()], "prefix")
                    noise = torch.randn(x0[sel].shape, generator=gen).to(x0.device, x0.dtype)
                    a = acp[t]
                    x_t = a.sqrt() * x0[sel] + (1 - a).sqrt() * noise
                    tt = torch.full((len(idx),), t, device=x0.device, dtype=torch.long)
                    with torch.enable_grad(), autocast(x0.device):
                        cond = encode_with_tokens(model, ids, pos, adv)
                        eps = model.unet(x_t, tt, encoder_hidden_states=cond).sample
                        target = denoising_target(model.scheduler, x0[sel], noise, t)  # ε (v for v-models)
                        per_item = (eps.float() - target.float()).pow(2).flatten(1).mean(1)
                        per_item.sum().backward()  # each image's gradient is its own search's gradient
                    total += float(per_item.detach().sum())
                    count += len(idx)
                frozen = probs.detach()[[i for i in range(n) if i not in set(todo)]].clone()
                opt.step()
                with torch.no_grad():
                    probs.data = project_simplex(probs.data)
                    done = [i for i in range(n) if i not in set(todo)]
                    if done:
                        probs.data[done] = frozen  # finished searches stay where they stopped
                losses.append(total / max(count, 1))
            # the round's prompt per image: the argmax word of every position, judged at the image's seed
            best = candidates[probs.detach().argmax(-1).cpu()]
            round_texts = {}
            for i in todo:
                ids, _ = layout_ids(model, words[i], best[i:i + 1], "prefix")
                round_texts[i] = decode_ids(model, ids[0].tolist())
            batch = [round_texts[i] for i in todo]
            imgs = generate(model, batch, [seeds[i] for i in todo], config=self.sample, progress=False).images
            ok = self.counted_judge(imgs)
            for j, i in enumerate(todo):
                texts[i], final_images[i], rounds_used[i] = round_texts[i], imgs[j], r + 1
                success[i] = bool(ok[j])
            if cfg.early_stop:
                todo = [i for i in todo if not success[i]]
            if cfg.iterations == 0:
                break  # without optimisation every round would judge the same prompt again
        if len(final_images) < n:  # images not attacked: the erased model's own image of the prompt
            rest = [i for i in range(n) if i not in final_images]
            imgs = generate(model, [prompts[i] for i in rest], [seeds[i] for i in rest], config=self.sample,
                            progress=False).images
            for j, i in enumerate(rest):
                final_images[i] = imgs[j]
        images = torch.stack([final_images[i] for i in range(n)])
        roundtrip = all(decode_ids(model, prompt_tokens(model, t)) == t for t in texts)
        extra = {"loss_curve": losses, "rounds_used": rounds_used, "attacked": int((~pre).sum()),
                 "not_attacked_already_detected": int(pre.sum()), "search_success": success.tolist(),
                 "distinct_optimisations": int((~pre).sum()), "candidates": len(candidates),
                 "text_roundtrip_exact": roundtrip}
        return {"images": images, "attack_prompts": texts, "extra": extra}

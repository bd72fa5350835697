"""Ring-A-Bell: a concept vector added to prompt embeddings, optionally turned into a text prompt by a genetic search
(Tsai, Hsu, Xie, Lin, Chen, Yu, Chen; "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion
Models?", ICLR 2024).

1. Concept vector: v = mean_i [E(sensitive_i) - E(neutral_i)] over prompt pairs that differ only by the concept
   (E = the text encoder's last hidden states, all 77 rows). For toy-world concepts the pairs are made automatically
   (every colour/style template with the concept vs the same template with each other value of its kind).
2. Continuous attack (as re-implemented for RECE): generate from E(prompt) + η v.
3. Genetic search (``search="genetic"``, the original's black-box attack): find a sequence of K vocabulary words
   whose embedding is closest (cosine) to E(prompt) + η v; generate from that text. By default the words naming the
   concept (and its synonyms) are excluded, so a success means other words brought the concept back. A search
   depends only on the text encoder, so models that share one (UCE, RECE and ESD edit only the UNet) reuse this
   process's finished search; ``extra["searches_reused"]`` counts them.

Example::

    atk = RingABell(erased, concept="triangle", eta=1.0)
    out = atk(["a red triangle"] * 8, seeds=range(8))
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import astuple, dataclass

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.sampling import encode_prompts, generate
from diffshield.redteam import ATTACKS
from diffshield.redteam.base import Attack, check, concept_words, decode_ids, word_token_ids

SEARCHES = ("none", "genetic")

#: finished genetic searches of this process, keyed by everything a search depends on (text encoder weights, target,
#: candidates, settings, generator state), so auditing several models that share a text encoder (UCE, RECE and ESD
#: edit only the UNet) searches once; the result is the one a new search would give, bit for bit
_SEARCHES: OrderedDict[str, tuple[list, float, torch.Tensor]] = OrderedDict()
_SEARCHES_MAX = 256


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def toy_concept_pairs(concept: str) -> list[tuple[str, str]]:
    """(with concept, without) prompt pairs for a toy concept: every 'a {colour} {style} {shape}' template that
    names the concept, against the same template with each other value of the concept's kind."""
    from diffshield.toyworld.concepts import other_concepts, prompt_for, resolve_concept
    from diffshield.toyworld.shapes import COLOURS, SHAPES, STYLES

    c = resolve_concept(concept)
    others = [o.name for o in other_concepts(c)]
    pairs = []
    for shape in SHAPES:
        for colour in (None,) + COLOURS:
            for style in (None,) + STYLES:
                slots = {"shape": shape, "colour": colour, "style": style}
                if c.head != "shape" and slots["shape"] != SHAPES[0] and colour is None:
                    continue  # keep the list short: shape-free variation is enough for colours and styles
                if c.head == "shape" and shape != SHAPES[0]:
                    continue
                for o in others:
                    with_c, without = dict(slots), dict(slots)
                    with_c[c.head], without[c.head] = c.name, o
                    pairs.append((prompt_for(**with_c), prompt_for(**without)))
    return list(dict.fromkeys(pairs))


@dataclass
class RingABellConfig:
    """Settings of Ring-A-Bell.

    Args:
        eta: η, the strength of the concept vector (default 1.0: on the toy world η = 3, the paper's nudity
            value, pushes even the original model off its concepts; the RECE re-implementation uses 3 for nudity
            and 0.9 for styles).
        pairs: (with concept, without concept) prompt pairs defining v (default None: automatic for toy concepts;
            required otherwise).
        search: "none" (default: continuous embedding E(prompt) + η v) or "genetic" (discrete prompt search).
        length: words in a searched prompt (default 8).
        population: genetic population size (default 48).
        generations: genetic generations (default 40).
        mutation: per-word mutation probability (default 0.2).
        elite: fraction of the population kept unchanged each generation (default 0.1).
        exclude_concept_words: keep the concept's own words (and synonyms) out of searched prompts (default True).
        seed: seed of the genetic search (default 0).
    """

    eta: float = 1.0
    pairs: list[tuple[str, str]] | None = None
    search: str = "none"
    length: int = 8
    population: int = 48
    generations: int = 40
    mutation: float = 0.2
    elite: float = 0.1
    exclude_concept_words: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.eta, (int, float)), f"eta must be a number, got {self.eta!r}")
        check(self.search in SEARCHES, f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        check(isinstance(self.length, int) and 1 <= self.length <= 70, f"length must be 1..70, got {self.length!r}")
        check(isinstance(self.population, int) and self.population >= 4,
              f"population must be an integer >= 4, got {self.population!r}")
        check(isinstance(self.generations, int) and self.generations >= 0,
              f"generations must be an integer >= 0, got {self.generations!r}")
        check(0 <= self.mutation <= 1, f"mutation must be in [0, 1], got {self.mutation!r}")
        check(0 <= self.elite < 1, f"elite must be in [0, 1), got {self.elite!r}")
        if self.pairs is not None:
            self.pairs = [tuple(p) for p in self.pairs]
            check(all(len(p) == 2 and all(isinstance(s, str) for s in p) for p in self.pairs) and self.pairs,
                  "pairs must be a non-empty list of (with concept, without concept) prompt pairs")
            same = [p for p in self.pairs if p[0].strip().lower() == p[1].strip().lower()]
            check(not same, f"a pair's two prompts must differ by the concept (their difference is the concept "
                            f"vector), got {same[0]!r}" if same else "")


@ATTACKS.register("ring-a-bell")
class RingABell(Attack):
    """Ring-A-Bell (Tsai et al., ICLR 2024): E(prompt) + η v, or a genetic prompt search towards it.

    Args (besides :class:`~diffshield.redteam.base.Attack`'s erased, original, concept, judge, sample):
        eta (default 1.0), pairs (default: automatic for toy concepts), search ("none" default, or "genetic"),
        length (8), population (48), generations (40), mutation (0.2), elite (0.1),
        exclude_concept_words (True), seed (0). Black-box in the text encoder: ``original`` is not needed.

    Call: ``atk(prompts, seeds)`` -> AttackResult with ``embeddings`` (continuous) or ``attack_prompts`` (genetic).
    """

    name = "ring-a-bell"
    config_cls = RingABellConfig
    needs_original = False
    access = "text"

    def concept_vector(self) -> tuple[torch.Tensor, int]:
        """(v, number of pairs): v = mean(E(with) - E(without)) over the pairs, (L, d)."""
        pairs = self.config.pairs
        if pairs is None:
            if not self.concept:
                raise DiffshieldError("ring-a-bell needs prompt pairs (pairs=[(with, without), ...]) or a concept")
            try:
                pairs = toy_concept_pairs(self.concept)
            except DiffshieldError:
                raise DiffshieldError(f"{self.concept!r} is not a toy concept: give ring-a-bell prompt pairs "
                                      "(pairs=[(with concept, without concept), ...])") from None
        e_with = encode_prompts(self.erased, [a for a, _ in pairs])
        e_without = encode_prompts(self.erased, [b for _, b in pairs])
        return (e_with - e_without).mean(0), len(pairs)

    def _genetic(self, target: torch.Tensor, candidates: torch.Tensor, gen: torch.Generator,
                 encoder_digest: str = "") -> tuple[list, float, bool]:
        """Genetic search for ``length`` word ids whose encoding is closest (cosine) to ``target`` (L, d).

        Returns (word ids, cosine, reused): a search this process already ran with the same text encoder, target,
        candidates, settings and generator state is reused (and the generator advanced as the search would)."""
        cfg = self.config
        key = None
        if encoder_digest:
            key = encoder_digest + _digest(target.float(), candidates, gen.get_state()) + repr(astuple(cfg))
            if key in _SEARCHES:
                ids, score, state = _SEARCHES[key]
                gen.set_state(state)
                return list(ids), score, True
        tok = self.erased.tokenizer
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        length_max = tok.model_max_length
        flat_target = target.flatten()

        def fitness(pop: torch.Tensor) -> torch.Tensor:
            ids = torch.full((pop.shape[0], length_max), pad, dtype=torch.long)
            ids[:, 0] = bos
            ids[:, 1:1 + cfg.length] = candidates[pop]
            ids[:, 1 + cfg.length] = eos
            with torch.no_grad():
                emb = self.erased.text_encoder(ids.to(flat_target.device))[0].flatten(1)
            # the search itself (sorting, crossover, CPU generator draws) stays on the CPU
            return torch.nn.functional.cosine_similarity(emb.float(), flat_target[None].float(), dim=1).cpu()

        n_cand = len(candidates)
        pop = torch.randint(n_cand, (cfg.population, cfg.length), generator=gen)
        fit = fitness(pop)
        n_elite = max(1, int(round(cfg.elite * cfg.population)))
        for _ in self.steps_bar(range(cfg.generations), "generations"):
            order = fit.argsort(descending=True)
            pop, fit = pop[order], fit[order]
            parents = pop[: cfg.population // 2]
            n_child = cfg.population - n_elite
            a = parents[torch.randint(len(parents), (n_child,), generator=gen)]
            b = parents[torch.randint(len(parents), (n_child,), generator=gen)]
            mask = torch.rand(n_child, cfg.length, generator=gen) < 0.5
            child = torch.where(mask, a, b)
            mutate = torch.rand(n_child, cfg.length, generator=gen) < cfg.mutation
            child = torch.where(mutate, torch.randint(n_cand, child.shape, generator=gen), child)
            pop = torch.cat([pop[:n_elite], child])
            fit = torch.cat([fit[:n_elite], fitness(child)])
        best = int(fit.argmax())
        ids, score = candidates[pop[best]].tolist(), float(fit[best])
        if key is not None:
            _SEARCHES[key] = (ids, score, gen.get_state())
            while len(_SEARCHES) > _SEARCHES_MAX:
                _SEARCHES.popitem(last=False)
        return ids, score, False

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        cfg = self.config
        v, n_pairs = self.concept_vector()
        distinct = list(dict.fromkeys(prompts))
        targets = encode_prompts(self.erased, distinct) + cfg.eta * v
        extra = {"concept_vector_norm": float(v.norm()), "n_pairs": n_pairs}
        if cfg.search == "none":
            emb = targets[[distinct.index(p) for p in prompts]]
            gen = generate(self.erased, prompts, seeds, prompt_embeds=emb, config=self.sample, progress=False)
            return {"images": gen.images, "embeddings": emb, "extra": extra}
        exclude = concept_words(self.concept) if cfg.exclude_concept_words else ()
        candidates = word_token_ids(self.erased, exclude)
        found, scores, reused = {}, {}, 0
        g = torch.Generator().manual_seed(cfg.seed)
        enc = _digest(*self.erased.text_encoder.state_dict().values())
        for p, t in zip(distinct, targets):
            ids, score, was_reused = self._genetic(t, candidates, g, enc)
            found[p], scores[p] = decode_ids(self.erased, ids), score
            reused += was_reused
        attack_prompts = [found[p] for p in prompts]
        gen = generate(self.erased, attack_prompts, seeds, config=self.sample, progress=False)
        extra.update({"searched_prompts": found, "cosine": scores, "distinct_optimisations": len(distinct),
                      "searches_reused": reused})
        return {"images": gen.images, "attack_prompts": attack_prompts, "extra": extra}


@ATTACKS.register("ring-a-bell-genetic")
class RingABellGenetic(RingABell):
    """Ring-A-Bell with the genetic prompt search on by default (``search="genetic"``); same settings otherwise."""

    name = "ring-a-bell-genetic"
    #: the official notebook: population 200, 3000 generations, mutation 0.25, 16 words (nudity, K = 16)
    presets = {"toy": {"length": 8, "population": 48, "generations": 40, "mutation": 0.2},
               "paper": {"length": 16, "population": 200, "generations": 3000, "mutation": 0.25}}
    zero_budget = {"generations": 0}

    def random_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str]:
        """``length`` random candidate words per prompt."""
        cfg = self.config
        cand = word_token_ids(self.erased, concept_words(self.concept) if cfg.exclude_concept_words else ())
        return [decode_ids(self.erased, cand[torch.randint(len(cand), (cfg.length,), generator=gen)].tolist())
                for _ in prompts]

    def __init__(self, erased, original=None, concept=None, config=None, **hp) -> None:
        if config is None:
            hp.setdefault("search", "genetic")
        super().__init__(erased, original, concept, config=config, **hp)

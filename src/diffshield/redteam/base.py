"""What every red-team attack shares: the result record, the concept judge, the base class and the soft-prompt encoder.

An attack is built once against an erased model and called on prompts and seeds (the torchattacks call shape)::

    atk = AdvEmbed(erased, original=original, concept="triangle", lamb_r=0.1)
    out = atk(["a red triangle"] * 4, seeds=[0, 1, 2, 3])
    out.asr, out.success, out.embeddings.shape

Success is judged per generated image by a *judge*: a callable ``images (N, 3, H, W) in [0, 1] -> bool (N,)``.
For toy-world concepts the default judge is the shipped detector's head for the concept (what
:mod:`diffshield.eval.erasure` counts as "detected"); for anything else pass your own (e.g. a NudeNet wrapper).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import ClassVar

import torch

from diffshield.core.checks import check_config
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import SampleConfig, check_model, check_prompts, check_seeds, encode, tokenize

Judge = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AttackResult:
    """What an attack produced, one entry per (prompt, seed).

    Attributes:
        attack: the attack's registry name.
        images: (N, 3, H, W) attacked generations in [0, 1].
        success: (N,) bool, the judge fired on the image (the concept came back).
        seeds: the seed of each image.
        prompts: the prompts the attack was asked to attack.
        attack_prompts: the text prompts the attack generated from (discrete attacks), else None.
        embeddings: (N, L, d) the prompt embeddings generated from (continuous attacks), else None.
        config: the attack's settings (JSON-able).
        seconds: wall time of the attack, generation and judging included.
        extra: attack-specific diagnostics (JSON-able): loss curve, searched prompts, judge calls, ...
        soft_tokens: (N, K, d_in) optimised input-token embeddings (soft-prompt attacks), else None.
        budget: the preset used, the budget fields as run and the paper's values (see :attr:`Attack.presets`).
        access: what the attack needs of the model: "weights", "gradients" or "text".
    """

    attack: str
    images: torch.Tensor
    success: torch.Tensor
    seeds: list[int]
    prompts: list[str]
    attack_prompts: list[str] | None = None
    embeddings: torch.Tensor | None = None
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    soft_tokens: torch.Tensor | None = None
    budget: dict = field(default_factory=dict)
    access: str = ""

    @property
    def asr(self) -> float:
        """Attack success rate: the fraction of images in which the judge fired."""
        return float(self.success.float().mean()) if len(self.success) else 0.0

    def to_dict(self) -> dict:
        """JSON-able summary (no tensors): ASR, per-sample success, seeds, prompts used, settings."""
        return {
            "attack": self.attack, "asr": self.asr, "n": len(self.seeds), "success": self.success.tolist(),
            "seeds": list(self.seeds), "prompts": list(self.prompts), "attack_prompts": self.attack_prompts,
            "config": self.config, "seconds": self.seconds, "extra": self.extra, "budget": self.budget,
            "access": self.access,
        }


class ToyConceptJudge:
    """Judge for a toy-world concept: the shipped detector's head for the concept predicts it.

    Args:
        concept: a toy concept word (shape, colour or style; synonyms resolve).
        detector: a loaded ConceptDetector (default None: ``load_detector("toy:detector")``).
    """

    def __init__(self, concept: str, detector=None) -> None:
        from diffshield.toyworld.concepts import resolve_concept
        from diffshield.toyworld.detector import load_detector

        self.concept = resolve_concept(concept)
        self.detector = detector if detector is not None else load_detector("toy:detector")

    #: what the report calls this judge
    description = "toy detector head"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pred = self.detector.predict(images)[self.concept.head][0]
        return pred == self.concept.index

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) the detector's probability of the concept (the report's confidence per tile)."""
        dev = next(self.detector.parameters()).device
        self.detector.eval()
        probs = self.detector(images.to(dev, torch.float32))[self.concept.head].softmax(-1)
        return probs[:, self.concept.index].cpu()


def default_judge(concept: str | None, judge: Judge | None = None, detector=None) -> Judge:
    """``judge`` if given, its answers checked (:class:`~diffshield.redteam.judges.UserJudge`: one boolean per image,
    so that probabilities are not silently read as True), else the toy detector's judge for ``concept`` (a clear
    error for non-toy concepts)."""
    if judge is not None:
        from diffshield.redteam.judges import UserJudge

        if not callable(judge):
            raise DiffshieldError("judge must be a callable images -> bool tensor")
        if isinstance(judge, (UserJudge, ToyConceptJudge)):
            return judge
        return UserJudge(judge, getattr(judge, "__qualname__", type(judge).__name__))
    if not concept:
        raise DiffshieldError("give the concept to attack (concept=...) or a judge callable")
    try:
        return ToyConceptJudge(concept, detector)
    except DiffshieldError as e:
        raise DiffshieldError(f"{e}; for concepts outside the toy world pass judge=callable(images) -> bool") from None


def config_dict(config: object) -> dict:
    """JSON-able settings of an attack config dataclass (tuples become lists)."""
    if not is_dataclass(config):
        return {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


class Attack:
    """Base class of the red-team attacks on an erased text-to-image model.

    Subclasses set ``name``, ``config_cls`` and ``needs_original`` and implement :meth:`forward`, which returns the
    attacked images and what they were generated from; :meth:`__call__` times it and judges every image.

    Args:
        erased: the erased T2IModel under attack.
        original: the model before erasure (default None; required by white-box attacks that compare the two).
        concept: the erased concept (default None; used for the default judge and for toy-world defaults).
        judge: images -> bool success (default None: the toy detector's judge for ``concept``).
        detector: the toy detector to build the default judge from (default None: ``toy:detector``).
        sample: sampling settings of the attacked generations (default SampleConfig(): DDIM 25 steps, guidance 5).
        config: the attack's config dataclass (default None: built from ``**hp``).
        **hp: the config's fields, e.g. ``lamb_r=0.1``.
    """

    name: ClassVar[str] = "attack"
    config_cls: ClassVar[type] = object
    needs_original: ClassVar[bool] = False
    #: what the attack needs: "weights" (closed form on the K/V matrices), "gradients" (back-propagation through
    #: the erased model) or "text" (the text encoder and the generator only, black-box in the UNet).
    access: ClassVar[str] = "weights"
    #: budget presets: {"toy": {field: value}, "paper": {field: value}}; ``budget="paper"`` runs the paper's.
    presets: ClassVar[dict[str, dict]] = {}

    @classmethod
    def prompt_layout(cls, config: object) -> tuple[str, int] | None:
        """(layout, searched tokens) of an attack that places tokens in the attacked prompt (see
        :func:`layout_ids`: "prefix", "none" or "every-3"), or None (default) for one that leaves it alone: what
        :func:`prompt_room` checks before an audit."""
        return None

    def __init__(self, erased: T2IModel, original: T2IModel | None = None, concept: str | None = None,
                 judge: Judge | None = None, detector=None, sample: SampleConfig | None = None,
                 config: object | None = None, budget: str = "toy", **hp) -> None:
        if config is not None and hp:
            raise DiffshieldError(f"{self.name}: give either config or keyword settings, not both")
        if self.presets and budget not in self.presets:
            raise DiffshieldError(f"{self.name}: budget must be one of {', '.join(self.presets)}, got {budget!r}")
        try:
            self.config = config if config is not None else self.config_cls(**{**self.presets.get(budget, {}),
                                                                                **hp})
        except TypeError as e:
            raise DiffshieldError(f"{self.name}: bad setting ({e})") from None
        self.budget_name = budget if config is None and not (set(hp) & set(self.presets.get(budget, {}))) \
            else "custom"
        if self.needs_original and original is None:
            raise DiffshieldError(f"the {self.name} attack is white-box: give the original model (original=...)")
        check_model(erased, "erased")
        if original is not None:
            check_model(original, "original")
        check_config(sample, SampleConfig, f"{self.name}: sample")
        self.erased = erased
        self.original = original
        self.concept = concept
        self.judge = default_judge(concept, judge, detector)
        self.sample = sample or SampleConfig()
        self._reference: torch.Tensor | None = None
        self._pre_success: torch.Tensor | None = None
        self.judge_calls = 0
        #: a transient tqdm bar over the search's steps (the audit turns it on with its own bar)
        self.progress = False

    def steps_bar(self, iterable, desc: str, total: int | None = None):
        """``iterable`` wrapped in a transient progress bar when :attr:`progress` is on."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=f"{self.name}: {desc}", total=total, leave=False, disable=not self.progress)

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        """Attack: return {"images", and any of "embeddings", "attack_prompts", "soft_tokens", "extra"}."""
        raise NotImplementedError

    #: the settings that turn the search off (the ``steps = 0`` baseline); None: no search to turn off.
    zero_budget: ClassVar[dict | None] = None

    def random_prompts(self, prompts: list[str], gen: torch.Generator) -> list[str] | None:
        """Random text prompts of the attack's own shape (its length, from its candidate words): the random-prompt
        baseline. None for attacks without a text search."""
        return None

    def budget_record(self) -> dict:
        """{"preset", "as_run": the budget fields' values, "paper": the paper's values} (empty without presets)."""
        if not self.presets:
            return {}
        cfg = config_dict(self.config)
        fields = list(dict.fromkeys(k for p in self.presets.values() for k in p))
        return {"preset": self.budget_name, "as_run": {k: cfg.get(k) for k in fields},
                "paper": dict(self.presets.get("paper", {}))}

    def original_images(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """The original model's image of every (prompt, seed), reused when the caller passed them in."""
        if self._reference is not None:
            return self._reference
        from diffshield.core.sampling import generate

        return generate(self.original, prompts, seeds, config=self.sample, progress=False).images

    def counted_judge(self, images: torch.Tensor) -> torch.Tensor:
        """The judge, counting its calls (attacks that use the judge during the search, as UnlearnDiffAtk's early
        stop does, call this; the final scoring is not counted)."""
        self.judge_calls += len(images)
        with torch.no_grad():
            return self.judge(images).bool().cpu()

    def __call__(self, prompts: Sequence[str] | str, seeds: Sequence[int] | None = None,
                 original_images: torch.Tensor | None = None,
                 pre_success: torch.Tensor | None = None) -> AttackResult:
        """Attack ``prompts`` (one image per prompt, image i from ``seeds[i]``; default seeds 0..N-1).

        ``original_images`` (N, 3, H, W): the original model's images of the same (prompt, seed) pairs, the targets
        of the attacks that need them (default None: generated). ``pre_success`` (N,) bool: the judge on the erased
        model's unattacked images, used by attacks that stop early (default None: judged by the attack)."""
        prompts = check_prompts(prompts)
        seeds = list(range(len(prompts))) if seeds is None else check_seeds(seeds, len(prompts))
        for name, t in (("original_images", original_images), ("pre_success", pre_success)):
            if t is not None and len(t) != len(prompts):
                raise DiffshieldError(f"{name} has {len(t)} entries for {len(prompts)} prompts")
        self._reference, self._pre_success, self.judge_calls = original_images, pre_success, 0
        start = time.perf_counter()
        out = self.forward(prompts, seeds)
        images = out["images"]
        with torch.no_grad():
            success = self.judge(images).bool().cpu()
        extra = dict(out.get("extra", {}))
        if self.judge_calls:
            extra["judge_calls"] = self.judge_calls
        return AttackResult(attack=self.name, images=images, success=success, seeds=seeds, prompts=prompts,
                            attack_prompts=out.get("attack_prompts"), embeddings=out.get("embeddings"),
                            config=config_dict(self.config), seconds=time.perf_counter() - start,
                            extra=extra, soft_tokens=out.get("soft_tokens"), budget=self.budget_record(),
                            access=self.access)


# --- Soft prompts: learnable input-token embeddings through the (frozen) text encoder -------------------------------


class SoftPromptEncoder:
    """Encode prompts whose token positions 1..K carry free input embeddings (differentiable in those embeddings).

    The prompt is tokenized with K placeholder tokens in front ("<p> <p> ... prompt"); a forward hook on the text
    encoder's input embedding replaces the placeholders' embeddings by ``soft`` (B, K, d_in). Works for any
    CLIPTextModel (the toy one and SD's).

    Args:
        model: the T2IModel whose text encoder and tokenizer are used.
        k: number of soft tokens (default: none given; required).
        placeholder: the placeholder word (default "a": any single-token word works; it is overwritten).
    """

    def __init__(self, model: T2IModel, k: int, placeholder: str = "a") -> None:
        self.model = model
        self.k = k
        self.placeholder = placeholder
        self.embedding = model.text_encoder.get_input_embeddings()
        n_tok = len(model.tokenizer(placeholder, add_special_tokens=False).input_ids)
        if n_tok != 1:
            raise DiffshieldError(f"placeholder {placeholder!r} is {n_tok} tokens for this tokenizer; use one word")

    def ids(self, prompts: list[str]) -> torch.Tensor:
        texts = [" ".join([self.placeholder] * self.k + ([p] if p else [])) for p in prompts]
        return tokenize(self.model, texts)

    def encode(self, soft: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B, L, d) text-encoder states for ``prompts`` with ``soft`` (B, K, d_in) at positions 1..K."""
        ids = self.ids(prompts)
        k = self.k

        def hook(_mod, _inp, out):
            return torch.cat([out[:, :1], soft.to(out.dtype), out[:, 1 + k:]], dim=1)

        handle = self.embedding.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                return self.model.text_encoder(ids)[0]
        finally:
            handle.remove()


def word_token_ids(model: T2IModel, exclude: Sequence[str] = ()) -> torch.Tensor:
    """Ids of whole-word vocabulary tokens (CLIP's ``</w>`` tokens of 2+ letters), minus any that contain, or are
    a 4+ letter part of, an excluded word. The candidates of discrete searches."""
    vocab = model.tokenizer.get_vocab()
    special = set(getattr(model.tokenizer, "all_special_ids", []))
    bad = [w.lower() for w in exclude if w]
    out = []
    for tok, i in vocab.items():
        if i in special or not tok.endswith("</w>"):
            continue
        word = tok[:-4].lower()
        if len(word) < 2 or not word.isalpha():
            continue
        if any(b in word or (len(word) >= 4 and word in b) for b in bad):
            continue
        out.append(i)
    if not out:
        raise DiffshieldError("no whole-word tokens left in the vocabulary for a discrete search")
    return torch.tensor(sorted(out))


def decode_ids(model: T2IModel, ids: Sequence[int]) -> str:
    """Token ids -> text: CLIP BPE tokens, a word ending at each ``</w>`` (independent of the tokenizer's decoder)."""
    tok = model.tokenizer
    special = set(getattr(tok, "all_special_ids", []))
    pieces = tok.convert_ids_to_tokens([int(i) for i in ids if int(i) not in special])
    return " ".join("".join(p.replace("</w>", " ") for p in pieces).split())


def concept_words(concept: str | None) -> tuple[str, ...]:
    """The words that name a concept: a toy concept's name and synonyms, else the concept's own words."""
    if not concept:
        return ()
    from diffshield.toyworld.concepts import resolve_concept

    try:
        return resolve_concept(concept).words
    except DiffshieldError:
        return tuple(concept.lower().split())


def check(cond: bool, message: str) -> None:
    """Raise a one-line DiffshieldError when a config field is invalid."""
    if not cond:
        raise DiffshieldError(message)


def concept_latents(original: T2IModel, prompts: list[str], per_prompt: int, seed: int,
                    sample: SampleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the concept made by the original model, ``per_prompt`` per prompt from seeds seed, seed+1, ...,
    and their VAE latents (scaled): ((P*m, 3, H, W), (P*m, C, h, w)), prompt-major."""
    from diffshield.core.sampling import generate

    rep = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + j for _ in prompts for j in range(per_prompt)]
    images = generate(original, rep, seeds, config=sample, progress=False).images
    return images, encode(original, images)


def init_soft_tokens(model: T2IModel, n: int, k: int, candidates: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, k, d_in) input embeddings of random candidate words: the starting point of a soft prompt."""
    table = model.text_encoder.get_input_embeddings().weight.detach()
    ids = candidates[torch.randint(len(candidates), (n, k), generator=gen)]  # CPU draws: the same on every device
    return table[ids.to(table.device)].float().clone()  # float32: the optimised tokens are master weights


def project_to_words(
    soft: torch.Tensor, model: T2IModel, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest candidate word (by L2 in the input-embedding table) for every soft token: (embeddings, ids)."""
    weight = model.text_encoder.get_input_embeddings().weight.detach()
    table = weight[candidates.to(weight.device)].float()
    dist = torch.cdist(soft.detach().float().reshape(-1, soft.shape[-1]), table)
    idx = dist.argmin(-1).reshape(soft.shape[:-1])
    return table[idx].to(soft.dtype), candidates[idx.cpu()]


# --- Text-space searches: token layouts, straight-through encodings, nearest words ----------------------------------

#: where the searched tokens go: "prefix" (before the prompt, UnlearnDiffAtk's prefix_k), "none" (no prompt words:
#: P4D-N) or "every-3" (one searched token before every 3 prompt tokens and one at the end: P4D-K's every_k = 3).
LAYOUTS = ("prefix", "none", "every-3")


def prompt_tokens(model: T2IModel, prompt: str) -> list[int]:
    """The prompt's token ids without start/end tokens."""
    return list(model.tokenizer(prompt, add_special_tokens=False).input_ids)


def n_searched(layout: str, k: int, n_prompt_tokens: int) -> int:
    """How many searched tokens a layout places: k for "prefix"/"none"; n // 3 + 1 for "every-3" (P4D-K)."""
    return n_prompt_tokens // 3 + 1 if layout == "every-3" else k


def layout_length(layout: str, k: int, n_prompt_tokens: int) -> int:
    """Token positions a layout takes, start and end tokens included."""
    if layout == "none":
        return k + 2
    return n_prompt_tokens + n_searched(layout, k, n_prompt_tokens) + 2


def prompt_room(model: T2IModel, layouts: dict[str, tuple[str, int]], prompts: Sequence[str]) -> None:
    """Refuse, in one line, a prompt that does not fit the tokenizer's length with an attack's searched tokens
    (``layouts``: attack name -> :meth:`Attack.prompt_layout`), before any attack runs."""
    length = model.tokenizer.model_max_length
    for p in dict.fromkeys(prompts):
        n = len(prompt_tokens(model, p))
        for name, (layout, k) in layouts.items():
            need = layout_length(layout, k, n)
            if need > length:
                raise DiffshieldError(f"{name}: the prompt {p[:40] + '...' if len(p) > 40 else p!r} is {n} tokens; "
                                      f"with {need - n - 2} searched tokens it needs {need} of the tokenizer's "
                                      f"{length}: shorten it")


def layout_ids(model: T2IModel, words: list[int], adv: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) of start + searched tokens ``adv`` (B, K) laid out around the prompt tokens ``words`` + end +
    padding, and the positions (K,) of the searched tokens (the same for every row)."""
    tok = model.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    b, k = adv.shape
    if layout == "prefix":
        slots = [-1] * k + list(words)
    elif layout == "none":
        slots = [-1] * k
    else:  # every-3: searched tokens at i % 4 == 0 of the n + n // 3 + 1 slots (P4D's optimize_k.py)
        total = len(words) + k
        it = iter(words)
        slots = [-1 if i % 4 == 0 else next(it) for i in range(total)]
    length = tok.model_max_length
    if len(slots) + 2 > length:
        raise DiffshieldError(f"prompt plus {k} searched tokens is longer than the tokenizer's {length} tokens")
    ids = torch.full((b, length), pad, dtype=torch.long)
    ids[:, 0] = bos
    pos = torch.tensor([1 + i for i, v in enumerate(slots) if v == -1])
    fixed = [(1 + i, v) for i, v in enumerate(slots) if v != -1]
    for i, v in fixed:
        ids[:, i] = v
    ids[:, pos] = adv
    ids[:, 1 + len(slots)] = eos
    return ids, pos


def encode_with_tokens(model: T2IModel, ids: torch.Tensor, pos: torch.Tensor,
                       adv_embeds: torch.Tensor) -> torch.Tensor:
    """Text-encoder states (B, L, d) of ``ids`` with the input embeddings at ``pos`` replaced by ``adv_embeds``
    (B, K, d_in): the forward pass of a straight-through search (differentiable in ``adv_embeds``)."""
    emb = model.text_encoder.get_input_embeddings()
    ids = ids.to(emb.weight.device)

    def hook(_mod, _inp, out):
        out = out.clone()
        out[:, pos.to(out.device)] = adv_embeds.to(out.dtype)
        return out

    handle = emb.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            return model.text_encoder(ids)[0]
    finally:
        handle.remove()


def project_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row of ``x`` (..., V) onto the probability simplex (exact, by sorting; the
    point UnlearnDiffAtk's bisection converges to)."""
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cond = (u - css / idx) > 0
    rho = cond.to(x.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(x.dtype)
    return (x - theta).clamp_min(0)


def nearest_words(vectors: torch.Tensor, model: T2IModel, candidates: torch.Tensor,
                  metric: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest candidate word of every input-space vector (..., d_in) by cosine (PEZ's projection) or L2:
    (their embeddings (..., d_in), their ids (...))."""
    weight = model.text_encoder.get_input_embeddings().weight.detach()
    table = weight[candidates.to(weight.device)].float()
    flat = vectors.detach().float().reshape(-1, vectors.shape[-1])
    if metric == "cosine":
        score = torch.nn.functional.normalize(flat, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        idx = score.argmax(-1)
    else:
        idx = torch.cdist(flat, table).argmin(-1)
    idx = idx.reshape(vectors.shape[:-1])
    return table[idx].to(vectors.dtype), candidates[idx.cpu()]


def token_report(model: T2IModel, vectors: torch.Tensor, concept: str | None, top: int = 3) -> list[list[dict]]:
    """For every input-space vector (N, K, d_in): its ``top`` nearest vocabulary words (cosine) and its L2 distance
    to the concept word's input embedding. What the report prints beside a soft prompt."""
    weight = model.text_encoder.get_input_embeddings().weight.detach().float()
    cands = word_token_ids(model)
    table = weight[cands.to(weight.device)]
    words = [decode_ids(model, [int(i)]) for i in cands]
    cw = concept_words(concept)
    c_ids = prompt_tokens(model, cw[0]) if cw else []
    c_vec = weight[c_ids].mean(0) if c_ids else None
    out = []
    for row in vectors.detach().float().to(weight.device):
        sim = torch.nn.functional.normalize(row, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        best = sim.topk(min(top, len(words)), dim=-1)
        toks = []
        for j in range(len(row)):
            d = {"nearest": [[words[int(i)], round(float(v), 3)] for v, i in zip(best.values[j], best.indices[j])]}
            if c_vec is not None:
                d["l2_to_concept_word"] = round(float((row[j] - c_vec).norm()), 3)
            toks.append(d)
        out.append(toks)
    return out

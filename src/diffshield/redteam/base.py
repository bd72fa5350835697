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

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import SampleConfig, tokenize

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
        extra: attack-specific diagnostics (JSON-able).
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

    @property
    def asr(self) -> float:
        """Attack success rate: the fraction of images in which the judge fired."""
        return float(self.success.float().mean()) if len(self.success) else 0.0

    def to_dict(self) -> dict:
        """JSON-able summary (no tensors): ASR, per-sample success, seeds, prompts used, settings."""
        return {
            "attack": self.attack, "asr": self.asr, "n": len(self.seeds), "success": self.success.tolist(),
            "seeds": list(self.seeds), "prompts": list(self.prompts), "attack_prompts": self.attack_prompts,
            "config": self.config, "seconds": self.seconds, "extra": self.extra,
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

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pred = self.detector.predict(images)[self.concept.head][0]
        return pred == self.concept.index


def default_judge(concept: str | None, judge: Judge | None = None, detector=None) -> Judge:
    """``judge`` if given, else the toy detector's judge for ``concept`` (a clear error for non-toy concepts)."""
    if judge is not None:
        if not callable(judge):
            raise DiffshieldError("judge must be a callable images -> bool tensor")
        return judge
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

    def __init__(self, erased: T2IModel, original: T2IModel | None = None, concept: str | None = None,
                 judge: Judge | None = None, detector=None, sample: SampleConfig | None = None,
                 config: object | None = None, **hp) -> None:
        if config is not None and hp:
            raise DiffshieldError(f"{self.name}: give either config or keyword settings, not both")
        try:
            self.config = config if config is not None else self.config_cls(**hp)
        except TypeError as e:
            raise DiffshieldError(f"{self.name}: bad setting ({e})") from None
        if self.needs_original and original is None:
            raise DiffshieldError(f"the {self.name} attack is white-box: give the original model (original=...)")
        self.erased = erased
        self.original = original
        self.concept = concept
        self.judge = default_judge(concept, judge, detector)
        self.sample = sample or SampleConfig()

    def forward(self, prompts: list[str], seeds: list[int]) -> dict:
        """Attack: return {"images", and any of "embeddings", "attack_prompts", "extra"}."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str] | str, seeds: Sequence[int] | None = None) -> AttackResult:
        """Attack ``prompts`` (one image per prompt, image i from ``seeds[i]``; default seeds 0..N-1)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise DiffshieldError("give at least one prompt to attack")
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise DiffshieldError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        start = time.perf_counter()
        out = self.forward(prompts, seeds)
        images = out["images"]
        with torch.no_grad():
            success = self.judge(images).bool().cpu()
        return AttackResult(attack=self.name, images=images, success=success, seeds=seeds, prompts=prompts,
                            attack_prompts=out.get("attack_prompts"), embeddings=out.get("embeddings"),
                            config=config_dict(self.config), seconds=time.perf_counter() - start,
                            extra=out.get("extra", {}))


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
    vae = original.vae
    with torch.no_grad():
        x = (images * 2 - 1).to(original.device, next(vae.parameters()).dtype)
        latents = vae.encode(x).latent_dist.mean.to(original.dtype) * vae.config.scaling_factor
    return images, latents


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

"""Text encoding and sampling loops over components (never ``pipe(...)``, whose ``__call__`` disables gradients).

- :func:`encode_prompts` tokenizes and encodes each distinct prompt once.
- :func:`generate` samples images in batches: DDIM by default, classifier-free guidance, one CPU generator per
  image (the seed of every image is returned with it), from prompts or precomputed prompt embeddings.
- :func:`denoise` is the loop itself. It is differentiable: called with gradients enabled, gradients flow to the
  prompt embeddings and to the initial latents (red-team attacks optimise both). :func:`generate_differentiable`
  wraps it with decoding.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffshield.core.checks import check_config, finite_number, whole_number
from diffshield.core.device import module_device, module_dtype
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import T2IModel
from diffshield.core.seeding import check_seeds, generators, randn_per_seed

SCHEDULERS = ("ddim", "ddpm", "native")


def check_model(model: object, what: str = "model") -> T2IModel:
    """``model`` if it is a loaded :class:`~diffshield.core.loading.T2IModel`, else a one-line DiffshieldError (a
    name or path such as "toy:t2i" must be loaded first with ``load_t2i``)."""
    if not isinstance(model, T2IModel):
        hint = f": load it first, load_t2i({str(model)!r})" if isinstance(model, (str, Path)) else ""
        raise DiffshieldError(f"{what} must be a T2IModel{hint}; got {type(model).__name__}")
    return model



def check_prompts(prompts: Iterable[str] | str, what: str = "prompts") -> list[str]:
    """``prompts`` as a list of strings (one string is one prompt; a tuple or a NumPy array of strings is accepted),
    or a one-line DiffshieldError: at least one, each a string."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or not isinstance(prompts, Iterable):
        raise DiffshieldError(f"{what} must be a list of strings, got {prompts!r}")
    out = list(prompts)
    if not out:
        raise DiffshieldError(f"give at least one prompt ({what} is empty)")
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        bad = bad[0]
        raise DiffshieldError(f"{what} must be strings, got {bad!r} ({type(bad).__name__})")
    return [str(p) for p in out]  # NumPy's str_ as plain str (JSON, dict keys)


@dataclass
class SampleConfig:
    """How to sample.

    Args:
        steps: denoising steps (default 25).
        guidance: classifier-free guidance scale; 1 disables guidance, and below 1 the prediction moves towards
            the unconditional one (0: unconditional samples), where stock diffusers turns guidance off (default
            5.0).
        batch_size: images per UNet batch (default 64).
        scheduler: "ddim" (default, eta 0: deterministic given the seed), "ddpm", or "native" (the model's own).
    """

    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 64
    scheduler: str = "ddim"

    def __post_init__(self) -> None:
        if not _is_whole(self.steps) or not 1 <= self.steps <= 1000:
            raise DiffshieldError(f"steps must be a whole number between 1 and 1000, got {self.steps!r}")
        if not _is_real(self.guidance) or not 0 <= self.guidance <= 100:  # the CLI's and the prompt files' range
            raise DiffshieldError(f"guidance must be a number between 0 and 100, got {self.guidance!r}")
        if not _is_whole(self.batch_size) or self.batch_size < 1:
            raise DiffshieldError(f"batch size must be a whole number >= 1, got {self.batch_size!r}")
        # plain Python numbers: NumPy ones would not serialise into the JSON reports that record the config
        self.steps, self.guidance, self.batch_size = int(self.steps), float(self.guidance), int(self.batch_size)
        if self.scheduler not in SCHEDULERS:
            raise DiffshieldError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")


def _is_whole(v: object) -> bool:
    """A Python or NumPy integer, not a bool (True passed as 1 step): :func:`~diffshield.core.checks.whole_number`."""
    try:
        whole_number(v, "")
        return True
    except DiffshieldError:
        return False


def _is_real(v: object) -> bool:
    """A finite Python or NumPy real number, not a bool or a string: :func:`~diffshield.core.checks.finite_number`."""
    try:
        finite_number(v, "")
        return True
    except DiffshieldError:
        return False


@dataclass
class Generation:
    """Generated images (N, 3, H, W) in [0, 1] with the prompt and seed of each image."""

    images: torch.Tensor
    seeds: list[int]
    prompts: list[str | None]
    config: SampleConfig = field(default_factory=SampleConfig)

    def manifest(self) -> list[dict]:
        return [{"index": i, "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(self.prompts, self.seeds))]


def tokenize(model: T2IModel, prompts: list[str]) -> torch.Tensor:
    """Token ids (N, L) of prompts, padded to the tokenizer's length, on the text encoder's device."""
    tok = model.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return ids.to(module_device(model.text_encoder))


#: the cache entry that records which text-encoder state the cached embeddings came from (not a prompt: a str key
#: can never equal it)
_STATE_KEY = ("__text_encoder_state__",)


def _encoder_state(encoder: torch.nn.Module) -> tuple:
    """What the cached embeddings depend on: the encoder object, and each parameter's storage, dtype and in-place
    version counter (every optimiser step, ``load_state_dict`` and ``mul_`` bumps it); a few microseconds."""
    return (id(encoder), tuple((p.data_ptr(), p.dtype, _version(p)) for p in encoder.parameters()))


def _version(p: torch.Tensor) -> int:
    """A tensor's in-place version counter; -1 for an inference-mode tensor, which has none (and which nothing
    outside inference mode may edit in place)."""
    try:
        return p._version
    except RuntimeError:
        return -1


def encode_prompts(model: T2IModel, prompts: list[str], grad: bool = False) -> torch.Tensor:
    """Text-encoder last hidden states (N, L, d) for prompts; each distinct prompt is encoded once and cached.

    The cache is dropped when the text encoder changes (its weights edited in place, replaced, moved or cast).

    Args:
        model: the text-to-image model.
        prompts: list of strings ("" is the unconditional prompt; one string is one prompt).
        grad: keep the graph to the text encoder's weights (default False: cached, no graph).
    """
    check_model(model)
    prompts = check_prompts(prompts)
    if grad:
        return model.text_encoder(tokenize(model, prompts))[0]
    cache = model._text_cache
    state = _encoder_state(model.text_encoder)
    if cache.get(_STATE_KEY) != state:  # the encoder was edited, replaced or moved since these were cached
        cache.clear()
        cache[_STATE_KEY] = state
    todo = [p for p in dict.fromkeys(prompts) if p not in cache]
    if todo:
        with torch.no_grad():
            emb = model.text_encoder(tokenize(model, todo))[0]
        cache.update({p: e for p, e in zip(todo, emb)})
    return torch.stack([cache[p] for p in prompts])


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict at x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, by the scheduler's ``prediction_type``:
    ε for ``"epsilon"`` (Stable Diffusion 1.x, 2.x-base, the toy models), the velocity √ᾱ_t ε - √(1-ᾱ_t) x0 for
    ``"v_prediction"`` (Stable Diffusion 2.x at 768 px), x0 for ``"sample"``. ``t``: one timestep or one per item."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind != "v_prediction":
        raise DiffshieldError(f"unknown prediction_type {kind!r} in the model's scheduler config")
    a = scheduler.alphas_cumprod.to(x0.device, torch.float32)[torch.as_tensor(t, device=x0.device)]
    a = a.reshape(-1, *[1] * (x0.dim() - 1)) if a.dim() else a
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)


def add_noise(model: T2IModel, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε at timestep ``t`` (one or one per item): the input the UNet is trained on, from
    the model's noise schedule, whatever sampler its folder names. Not ``model.scheduler.add_noise``: the Euler
    family's adds σ_t ε to x0 unscaled (its sampler scales the UNet input by 1/√(σ_t² + 1) instead) and
    DPM-Solver's looks t up in its own step schedule, so on Stable Diffusion 2.x folders, which ship those
    schedulers, the UNet would see inputs it never saw in training. DDPM's ``add_noise`` on the same config (the
    same arithmetic as DDIM's and PNDM's)."""
    from diffusers import DDPMScheduler

    vp = DDPMScheduler.from_config(model.scheduler.config)
    steps = torch.as_tensor(t)
    n_train = len(vp.alphas_cumprod)
    if steps.is_floating_point() or steps.is_complex() or steps.dtype == torch.bool or (
            steps.numel() and not 0 <= int(steps.min()) <= int(steps.max()) < n_train):
        # a negative t indexed the schedule from its end: x_t of another timestep, without a word
        raise DiffshieldError(f"timesteps must be whole numbers in [0, {n_train - 1}], got {t!r}")
    return vp.add_noise(x0, noise, steps.to(x0.device))


def make_scheduler(model: T2IModel, kind: str = "ddim"):
    """A fresh scheduler of the given kind, configured from the model's own scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "native":
        return type(model.scheduler).from_config(model.scheduler.config)
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind]
    return cls.from_config(model.scheduler.config)


def denoise(
    model: T2IModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    steps: int = 25,
    guidance: float = 5.0,
    scheduler: str = "ddim",
    generator: list[torch.Generator] | None = None,
    stop_at: int | None = None,
    start_at: int = 0,
) -> torch.Tensor:
    """Run the reverse diffusion from initial latents (already scaled by the scheduler's init sigma).

    Differentiable when called with gradients enabled. ``cond``/``uncond``: (N, L, d) embeddings (uncond may
    be (1, L, d) and is broadcast; None disables guidance). ``stop_at``: return the latents after this many steps.
    ``start_at``: ``latents`` are those after this many steps (default 0: pure noise); with a stateless scheduler
    (DDIM, DDPM), a call with ``stop_at=s`` and one with ``start_at=s`` on its output run the whole schedule, each
    with its own prompt.
    """
    if not _is_whole(steps) or not 1 <= steps <= 1000:
        raise DiffshieldError(f"steps must be a whole number between 1 and 1000, got {steps!r}")
    if cond.shape[0] != latents.shape[0]:
        raise DiffshieldError(f"{latents.shape[0]} latents but {cond.shape[0]} prompt embeddings; give one per latent")
    if uncond is not None and uncond.shape[0] not in (1, latents.shape[0]):
        raise DiffshieldError(f"{uncond.shape[0]} unconditional embeddings for {latents.shape[0]} latents; give one "
                              "or one per latent")
    device = module_device(model.unet)
    if latents.device != device:
        raise DiffshieldError(f"the latents are on {latents.device} but the model on {device}: move them first, "
                              "latents.to(model.device)")
    sched = make_scheduler(model, scheduler)
    sched.set_timesteps(int(steps), device=latents.device)
    use_cfg = uncond is not None and guidance != 1.0
    if use_cfg and uncond.shape[0] == 1 and cond.shape[0] > 1:
        uncond = uncond.expand(cond.shape[0], -1, -1)
    both = torch.cat([uncond, cond]) if use_cfg else None  # built once, not per step
    # a stochastic step (DDPM, a native Euler-ancestral, ...) draws its noise from the per-image generators
    kwargs = {"generator": generator} if generator and "generator" in inspect.signature(sched.step).parameters else {}
    x = latents
    for i, t in enumerate(sched.timesteps):
        if stop_at is not None and i >= stop_at:
            break
        if i < start_at:
            continue
        inp = sched.scale_model_input(x, t)
        if use_cfg:
            eps = model.unet(torch.cat([inp, inp]), t, encoder_hidden_states=both).sample
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        else:
            eps = model.unet(inp, t, encoder_hidden_states=cond).sample
        x = sched.step(eps, t, x, **kwargs).prev_sample
    return x


def decode(model: T2IModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (N, 3, H, W) in [0, 1] (differentiable)."""
    x = model.vae.decode(latents.to(module_dtype(model.vae)) / model.vae.config.scaling_factor).sample
    return ((x + 1) / 2).clamp(0, 1)


def encode(model: T2IModel, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on any device -> scaled VAE latents (posterior means) in the UNet's dtype on the
    model's device, without gradients; the inverse of :func:`decode`."""
    vae = model.vae
    with torch.no_grad():
        x = (images * 2 - 1).to(model.device, module_dtype(vae))
        return vae.encode(x).latent_dist.mean.to(model.dtype) * vae.config.scaling_factor


def initial_latents(
    model: T2IModel,
    seeds: list[int],
    scheduler: str = "ddim",
    steps: int | None = None,
    gens: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """One standard-normal latent per seed, each from its own CPU generator (the diffusers convention), scaled by the
    sampler's initial noise sigma and moved to the model's device and dtype: seed k starts from the same noise on the
    CPU and on a GPU.

    Args:
        model: the text-to-image model.
        seeds: one seed per latent, whole numbers in [0, 2**64 - 1] (see :func:`check_seeds`).
        scheduler: the sampler the latents start (default "ddim"; see :func:`make_scheduler`). Its ``init_noise_sigma``
            scales the noise: 1 for DDIM, DDPM, PNDM and DPM-Solver, about σ_max for the Euler family.
        steps: the sampler's step count; as stock diffusers, the sigma is read after ``set_timesteps(steps)`` (it
            depends on the steps for the Euler family). Default None: the unset schedule's.
        gens: the per-image CPU generators to draw from (default: fresh ones seeded with ``seeds``); a stochastic
            sampler then continues drawing its step noise from them, as ``StableDiffusionPipeline`` does.
    """
    check_model(model)
    seeds = check_seeds(seeds)
    if not seeds:
        raise DiffshieldError("give at least one seed")
    sched = make_scheduler(model, scheduler)
    if steps is not None:
        sched.set_timesteps(steps)
    if gens is None:
        noise = randn_per_seed(seeds, model.latent_shape)
    else:
        if len(gens) != len(seeds):
            raise DiffshieldError(f"{len(seeds)} seeds but {len(gens)} generators")
        noise = torch.stack([torch.randn(model.latent_shape, generator=g) for g in gens])
    return (noise * sched.init_noise_sigma).to(model.device, model.dtype)


def generate(
    model: T2IModel,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt: str = "",
    config: SampleConfig | None = None,
    progress: bool = True,
) -> Generation:
    """Generate one image per (prompt or embedding, seed), in batches, without gradients.

    Args:
        model: a loaded text-to-image model.
        prompts: N prompts, or one prompt as a string (or None when ``prompt_embeds`` is given).
        seeds: N seeds (default 0..N-1), whole numbers in [0, 2**64 - 1]; image i starts from noise drawn by a
            generator seeded with seeds[i].
        prompt_embeds: (N, L, d) precomputed text embeddings instead of prompts.
        negative_prompt: the unconditional prompt for guidance (default "").
        config: steps, guidance, batch size, scheduler (default SampleConfig()).
        progress: show a progress bar over batches (default True).

    Returns:
        a :class:`Generation` whose images are float32 on the CPU, whatever device and dtype the model uses.
    """
    check_model(model)
    config = check_config(config, SampleConfig)
    if not isinstance(negative_prompt, str):
        raise DiffshieldError(f"negative_prompt must be one string, got {negative_prompt!r}")
    uncond = encode_prompts(model, [negative_prompt])
    if prompt_embeds is None:
        if prompts is None:
            raise DiffshieldError("give at least one prompt (or prompt embeddings)")
        prompts = check_prompts(prompts)  # one string is one prompt, not its characters
        n = len(prompts)
    else:
        width = uncond.shape[-1]
        if not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != width \
                or not len(prompt_embeds):
            got = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
            raise DiffshieldError(f"prompt_embeds must be a torch tensor (N, L, {width}) with N >= 1, got {got}")
        if not torch.isfinite(prompt_embeds).all():  # NaN/inf conditioning draws noise, not an image
            raise DiffshieldError("prompt_embeds holds NaN or infinite values")
        n = prompt_embeds.shape[0]
        if prompts is not None:
            prompts = check_prompts(prompts)
            if len(prompts) != n:
                raise DiffshieldError(f"{len(prompts)} prompts but {n} prompt embeddings")
    seeds = list(range(n)) if seeds is None else check_seeds(seeds, n)
    out = []
    batches = range(0, n, config.batch_size)
    with torch.no_grad():
        for i in tqdm(batches, desc="generate", disable=not progress or len(batches) < 2, leave=False):
            j = min(n, i + config.batch_size)
            if prompt_embeds is not None:
                cond = prompt_embeds[i:j].to(uncond.device, uncond.dtype)
            else:
                cond = encode_prompts(model, prompts[i:j])
            # one CPU generator per image draws its initial noise and then, for a stochastic sampler (DDPM, a native
            # Euler ancestral, ...), its step noise: the draws of StableDiffusionPipeline given these generators
            gens = generators(seeds[i:j])
            lat = initial_latents(model, seeds[i:j], config.scheduler, config.steps, gens)
            lat = denoise(model, lat, cond, uncond, config.steps, config.guidance, config.scheduler, gens)
            out.append(decode(model, lat).float().cpu())
    labels = list(prompts) if prompts is not None else [None] * n
    return Generation(torch.cat(out), seeds, labels, config)


def generate_differentiable(
    model: T2IModel,
    prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    steps: int = 10,
    guidance: float = 5.0,
    uncond_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) from embeddings and initial latents, keeping the graph to both (for attacks).

    Args:
        prompt_embeds: (N, L, d) conditioning embeddings (requires_grad as needed).
        latents: (N, C, h, w) initial latents (requires_grad as needed), e.g. from :func:`initial_latents`.
        steps: DDIM steps (default 10; memory grows with steps).
        guidance: classifier-free guidance (default 5.0).
        uncond_embeds: unconditional embeddings (default: the encoded empty prompt).
    """
    if uncond_embeds is None:
        uncond_embeds = encode_prompts(model, [""])
    latents = latents.to(model.device)
    with torch.enable_grad():
        lat = denoise(model, latents, prompt_embeds, uncond_embeds, steps, guidance, "ddim")
        return decode(model, lat)

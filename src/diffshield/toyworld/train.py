"""Training recipes that rebuild every shipped toy-world weight from scratch.

``diffshield toyworld train --work runs/toyworld --out src/diffshield/toyworld/weights`` runs, in order:

1. render an image pool from ShapesWorld (seeded; ``world_version`` 2 for the shipped weights, 1 for the first ones);
2. train the AutoencoderKL (reconstruction + small KL), or copy a trained one (``vae_from``);
3. train the concept detector on real images and VAE reconstructions (so that it reads decoded images as well);
4. encode the pool to latents and train the UNet2DConditionModel jointly with the CLIPTextModel
   (epsilon prediction, SD 1.x schedule, 10 % caption dropout for classifier-free guidance);
4b. optionally (``unet_extra_steps`` > 0; off for the shipped weights) continue that training for more steps
   (fresh AdamW, warmup then cosine to 0 from ``unet_extra_lr``, new batches): a longer-trained toy model for
   experiments (tried to see whether the styles separate; they did not);
5. assemble a stock ``StableDiffusionPipeline`` folder and write ``recipe.json`` (command, seeds, steps, timings).

The shipped t2i model and detector (world version 2) were trained with ``--vae toy``: their VAE is the one the
first recipe (``--world-version 1``) trained, which reconstructs both worlds (``recipe.json`` has the command).

Every stage writes its result into the work folder and is skipped when it is already there; the UNet stage saves a
checkpoint every ``ckpt_every`` steps and resumes from the latest one, so an interrupted run loses little. Each stage
records the settings its result depends on (``<stage>.settings.json`` beside it, see :func:`stage_settings`): a
finished or checkpointed stage made with other settings (seed, pool size, steps, ...) is refused in one line before
any work, never reused and never deleted. Settings that do not change a result (threads, ``ckpt_every``, the output
folder) do not count.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffshield.core.errors import DiffshieldError
from diffshield.toyworld import models
from diffshield.toyworld.detector import HEADS, ConceptDetector
from diffshield.toyworld.shapes import VOCAB_WORDS, WORLD_VERSIONS, ShapesWorld, caption
from diffshield.toyworld.tokenizer import build_tokenizer_files


@dataclass
class RecipeConfig:
    """Settings of the toy-world recipe (defaults are those of the shipped weights).

    Args:
        seed: master seed (default 0).
        pool_size: number of training images rendered once (default 40000).
        vae_steps: AutoencoderKL steps at batch 64 (default 800).
        detector_steps: detector steps at batch 128 (default 600).
        unet_steps: UNet + text encoder steps at batch 128 (default 2000).
        unet_lr: peak AdamW learning rate of the UNet stage (default 4e-4).
        unet_extra_steps: steps of the optional continuation stage 4b, 0 to skip it (default 0: the shipped weights
            did not use it).
        unet_extra_lr: peak learning rate of stage 4b (default 2e-4).
        caption_dropout: share of empty captions, for classifier-free guidance (default 0.1).
        ckpt_every: UNet checkpoint interval in steps (default 100).
        threads: torch CPU threads (default 2; 0 = torch's default, one per core). ``recipe.json`` records the
            number the run used.
        world_version: ShapesWorld texture version of the pool (default 2, the shipped weights; 1 draws smaller
            dots, the first shipped weights, see :data:`diffshield.toyworld.shapes.WORLD_VERSIONS`).
        vae_from: an already trained AutoencoderKL folder to use instead of training stage 2, "toy" for the shipped
            one (default None: train it).
    """

    seed: int = 0
    pool_size: int = 40000
    vae_steps: int = 800
    detector_steps: int = 600
    unet_steps: int = 2000
    unet_lr: float = 4e-4
    unet_extra_steps: int = 0
    unet_extra_lr: float = 2e-4
    caption_dropout: float = 0.1
    ckpt_every: int = 100
    threads: int = 2
    world_version: int = 2
    vae_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("pool_size", "vae_steps", "detector_steps", "unet_steps", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (torch's default) or more, got {self.threads}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.unet_lr <= 0 or self.unet_extra_lr <= 0:
            raise ValueError(f"learning rates must be positive, got {self.unet_lr} and {self.unet_extra_lr}")
        if self.unet_extra_steps < 0:
            raise ValueError(f"unet_extra_steps must be 0 or more, got {self.unet_extra_steps}")
        if self.world_version not in WORLD_VERSIONS:
            raise ValueError(f"world_version must be one of {sorted(WORLD_VERSIONS)}, got {self.world_version}")


#: the stages whose results depend on the settings, in the order they run, with the outputs each leaves in the work
#: folder (a finished result or a checkpoint) and the name an error gives it
STAGES = {
    "pool": (("pool.npz",), "pool"),
    "vae": (("vae",), "VAE"),
    "latents": (("latents.safetensors",), "latent cache"),
    "detector": (("detector",), "detector"),
    "t2i": (("t2i_final", "t2i_ckpt"), "UNet and text encoder"),
    "t2i_extra": (("t2i_extra_final", "t2i_extra_ckpt"), "continued UNet and text encoder"),
}


def _from_weights_settings(weights: str | Path) -> dict:
    return {"from_weights": str(Path(weights).resolve())}


def stage_settings(cfg: RecipeConfig, from_weights: str | Path | None = None) -> dict[str, dict]:
    """The settings each stage's result depends on (its own and those of the stages it is made from), by stage name
    (:data:`STAGES`). ``from_weights``: the VAE, detector and UNet stage are copies of those weights (see
    :func:`seed_work_from`). Threads, ``ckpt_every`` and the output folder change no result and are left out."""
    pool = {"seed": cfg.seed, "pool_size": cfg.pool_size, "world_version": cfg.world_version}
    if from_weights is not None:
        vae = detector = t2i = _from_weights_settings(from_weights)
    elif cfg.vae_from is not None:
        vae = {"vae_from": cfg.vae_from if cfg.vae_from == "toy" else str(Path(cfg.vae_from).resolve())}
    else:
        vae = {**pool, "vae_steps": cfg.vae_steps}
    latents = {**pool, **vae}
    if from_weights is None:
        detector = {**latents, "detector_steps": cfg.detector_steps}
        t2i = {**latents, "unet_steps": cfg.unet_steps, "unet_lr": cfg.unet_lr, "caption_dropout": cfg.caption_dropout}
    t2i_extra = {**latents, **t2i, "unet_extra_steps": cfg.unet_extra_steps, "unet_extra_lr": cfg.unet_extra_lr,
                 "caption_dropout": cfg.caption_dropout}
    return {"pool": pool, "vae": vae, "latents": latents, "detector": detector, "t2i": t2i, "t2i_extra": t2i_extra}


def _present(work: Path, stage: str) -> list[Path]:
    return [work / name for name in STAGES[stage][0] if (work / name).exists()]


def _settings_file(work: Path, stage: str) -> Path:
    return work / f"{stage}.settings.json"


def _problem(work: Path, stage: str, want: dict) -> str | None:
    """Why the stage's outputs in ``work`` cannot be reused with the settings ``want``; None when there are none, or
    when they were made with ``want``."""
    if not _present(work, stage):
        return None
    what = STAGES[stage][1]
    try:
        have = json.loads(_settings_file(work, stage).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        have = None
    if not isinstance(have, dict):
        return f"holds a {what} that records no settings (made by an older diffshield)"
    if have == want:
        return None
    show = lambda v: "none" if v is None else str(v)  # noqa: E731
    diffs = [f"{k}: {show(have.get(k))} there, {show(want.get(k))} now" for k in dict.fromkeys([*want, *have])
             if have.get(k) != want.get(k)]
    return f"holds a {what} made with other settings ({'; '.join(diffs)})"


def _refuse(work: Path, bad: list[tuple[str, str]]) -> None:
    if bad:
        first = ", ".join(str(p) for p in _present(work, bad[0][0]))
        rest = ", ".join(str(p) for stage, _ in bad[1:] for p in _present(work, stage))
        raise DiffshieldError(f"{work} {bad[0][1]}; use another --work or remove {first}"
                              + (f" (and what was made with it: {rest})" if rest else ""))


def check_work(cfg: RecipeConfig, work: str | Path, from_weights: str | Path | None = None) -> None:
    """Refuse, in one line and before any work, a work folder holding a finished or checkpointed stage made with
    other settings than ``cfg`` (and ``from_weights``) give it, or one that records none; naming what differs and
    every stage folder that would have to go. Nothing is deleted."""
    work = Path(work)
    want = stage_settings(cfg, from_weights)
    stages = [s for s in STAGES if s != "t2i_extra" or cfg.unet_extra_steps > 0]
    _refuse(work, [(s, why) for s in stages if (why := _problem(work, s, want[s])) is not None])


def _begin(work: Path, stage: str, want: dict) -> None:
    """Before a stage runs or is reused: refuse its outputs in ``work`` if made with other settings; when it has
    none yet, record ``want`` as the settings it is made with."""
    why = _problem(work, stage, want)
    if why is not None:
        _refuse(work, [(stage, why)])
    if not _present(work, stage):
        from diffshield.core.io import atomic_write_json

        atomic_write_json(_settings_file(work, stage), {"stage": stage, "settings": want})


def _log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "train.log", "a") as f:
        f.write(line + "\n")


def _lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine down to ``floor`` x ``peak`` (stage 4b uses floor 0)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def stage_pool(cfg: RecipeConfig, work: Path) -> dict[str, np.ndarray]:
    path = work / "pool.npz"
    if path.exists():  # the world version is also stored in the pool itself
        with np.load(path) as d:
            found = int(d["world_version"]) if "world_version" in d.files else 1
        if found != cfg.world_version:
            raise DiffshieldError(f"{path} was rendered for world version {found}, not {cfg.world_version}: use "
                                  "another --work folder")
    _begin(work, "pool", stage_settings(cfg)["pool"])
    if not path.exists():
        world = ShapesWorld(version=cfg.world_version)
        rng = np.random.default_rng(cfg.seed)
        labels = world.sample_labels(cfg.pool_size, rng)
        batch = world.render_labels(labels, seed=cfg.seed + 1)
        tmp = work / "pool.tmp.npz"
        np.savez(tmp, images=(batch.images * 255).round().astype(np.uint8), world_version=cfg.world_version,
                 **labels)
        tmp.rename(path)
    with np.load(path) as d:
        return {k: d[k] for k in d.files if k != "world_version"}


def _images(pool: dict[str, np.ndarray], idx: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(pool["images"][idx]).permute(0, 3, 1, 2).float() / 255.0


def _vae_source(vae_from: str) -> Path:
    """The AutoencoderKL folder that ``vae_from`` names ("toy" = the shipped one); a one-line error otherwise."""
    from diffshield.toyworld.names import TOY_ROOT

    src = TOY_ROOT / "t2i" / "vae" if vae_from == "toy" else Path(vae_from)
    if not (src / "config.json").is_file():
        raise DiffshieldError(f"--vae {vae_from}: {src} is not an AutoencoderKL folder (needs config.json)")
    return src


def stage_vae(cfg: RecipeConfig, work: Path, pool: dict[str, np.ndarray], from_weights: str | Path | None = None):
    out = work / "vae"
    if cfg.vae_from is not None and from_weights is None and not out.exists():
        _vae_source(cfg.vae_from)  # a one-line error before anything is written
    _begin(work, "vae", stage_settings(cfg, from_weights)["vae"])
    if cfg.vae_from is not None and not any(out.glob("diffusion_pytorch_model.*")):
        import shutil

        tmp = work / "vae.tmp"  # a killed copy must not pass for a finished stage (its config.json is written first)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(_vae_source(cfg.vae_from), tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    if (out / "config.json").exists() and any(out.glob("diffusion_pytorch_model.*")):  # finished, not half-saved
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(out)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    n = len(pool["shape"])
    for step in tqdm(range(cfg.vae_steps), desc="vae", mininterval=10):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, 1e-3, warmup=50)
        x = _images(pool, rng.integers(0, n, 64)) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            _log(work, f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f}")
    # SD convention: latents are multiplied by scaling_factor so that they have unit variance.
    with torch.no_grad():
        z = vae.encode(_images(pool, np.arange(min(n, 2000))) * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    import shutil

    tmp = work / "vae.tmp"  # diffusers writes config.json before the weights: a killed save looked finished
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _log(work, f"vae saved, scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


def stage_detector(cfg: RecipeConfig, work: Path, pool: dict[str, np.ndarray], vae,
                   from_weights: str | Path | None = None) -> ConceptDetector:
    out = work / "detector"
    _begin(work, "detector", stage_settings(cfg, from_weights)["detector"])
    if (out / "config.json").exists():
        return ConceptDetector.load(out)
    torch.manual_seed(cfg.seed + 3)
    rng = np.random.default_rng(cfg.seed + 3)
    n = len(pool["shape"])
    # VAE reconstructions of part of the pool: generated images are decoded by this VAE too.
    n_rec = min(n, 10000)
    with torch.no_grad():
        recs = []
        for i in range(0, n_rec, 500):
            x = _images(pool, np.arange(i, min(n_rec, i + 500))) * 2 - 1
            recs.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
        recs = torch.cat(recs)
    det = ConceptDetector()
    opt = torch.optim.AdamW(det.parameters(), lr=2e-3, weight_decay=1e-4)
    det.train()
    for step in tqdm(range(cfg.detector_steps), desc="detector", mininterval=10):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.detector_steps, 2e-3, warmup=50)
        idx = rng.integers(0, n, 128)
        x = _images(pool, idx)
        use_rec = torch.from_numpy((rng.random(128) < 0.4) & (idx < n_rec))
        if use_rec.any():
            x[use_rec] = recs[torch.from_numpy(idx)[use_rec]]
        x = (x + 0.02 * torch.randn_like(x) * torch.rand(len(x), 1, 1, 1)).clamp(0, 1)
        logits = det(x)
        loss = sum(F.cross_entropy(logits[k], torch.from_numpy(pool[k][idx])) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == cfg.detector_steps - 1:
            _log(work, f"detector step {step} loss {loss.item():.4f}")
    det.eval()
    det.save(out)
    return det


def _tokenize(tokenizer, texts: list[str], cache: dict[str, list[int]]) -> torch.Tensor:
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        cache.update(zip(missing, ids.input_ids))
    return torch.tensor([cache[t] for t in texts])


def _latents(work: Path, pool: dict[str, np.ndarray], vae, settings: dict) -> dict[str, torch.Tensor]:
    """The VAE posterior (mean, std) of every pool image, encoded once into ``work/latents.safetensors`` (made with
    ``settings``, those of the pool and the VAE)."""
    lat_path = work / "latents.safetensors"
    _begin(work, "latents", settings)
    if not lat_path.exists():
        n = len(pool["shape"])
        means, stds = [], []
        with torch.no_grad():
            for i in tqdm(range(0, n, 1000), desc="encode latents"):
                post = vae.encode(_images(pool, np.arange(i, min(n, i + 1000))) * 2 - 1).latent_dist
                means.append(post.mean)
                stds.append(post.std)
        tmp = work / "latents.tmp.safetensors"  # a killed write must not leave a truncated file in its place
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, str(tmp))
        tmp.replace(lat_path)
    return load_file(str(lat_path))


def seed_work_from(weights: str | Path, work: str | Path) -> None:
    """Fill a work folder with already trained weights (a folder laid out like the shipped ``toyworld/weights``:
    ``t2i/`` and ``detector/``) as the results of stages 2-4, so that a run only does what comes after (stage 4b).
    The tokenizer is rebuilt from the toy vocabulary, as in stage 4. Stops with a one-line error if the folder lacks
    a component; leaves the components a work folder already has alone."""
    import shutil

    weights, work = Path(weights), Path(work)
    need = [weights / "t2i" / c for c in ("vae", "unet", "text_encoder")] + [weights / "detector"]
    missing = [str(p) for p in need if not p.is_dir()]
    if missing:
        raise DiffshieldError(f"--from-weights {weights}: missing {missing[0]}; give a folder with t2i/ (a "
                              "StableDiffusionPipeline) and detector/, like the package's toyworld/weights")
    work.mkdir(parents=True, exist_ok=True)
    for stage in ("vae", "detector", "t2i"):  # refuse stages made otherwise, record the copies' origin
        _begin(work, stage, _from_weights_settings(weights))
    for src, dst in ((weights / "t2i" / "vae", work / "vae"), (weights / "detector", work / "detector"),
                     (weights / "t2i" / "unet", work / "t2i_final" / "unet"),
                     (weights / "t2i" / "text_encoder", work / "t2i_final" / "text_encoder")):
        if not dst.exists():
            shutil.copytree(src, dst)
    (work / "t2i_final" / "done").write_text(f"from {weights}")


def stage_t2i(cfg: RecipeConfig, work: Path, pool: dict[str, np.ndarray], vae, from_weights: str | Path | None = None):
    from transformers import CLIPTokenizer

    settings = stage_settings(cfg, from_weights)
    _begin(work, "t2i", settings["t2i"])
    final = work / "t2i_final"
    tok_dir = work / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        build_tokenizer_files(VOCAB_WORDS, tok_dir, model_max_length=models.MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if (final / "done").exists():
        return tokenizer
    lat = _latents(work, pool, vae, settings["latents"])
    sf = vae.config.scaling_factor

    torch.manual_seed(cfg.seed + 4)
    unet = models.make_unet()
    te = models.make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id)
    _train_t2i(unet, te, tokenizer, lat, sf, pool, cfg, work, name="t2i", stream=5, steps=cfg.unet_steps,
               lr=lambda step: _lr(step, cfg.unet_steps, cfg.unet_lr), final=final)
    return tokenizer


def stage_t2i_extra(cfg: RecipeConfig, work: Path, pool: dict[str, np.ndarray], vae, tokenizer,
                    from_weights: str | Path | None = None) -> Path:
    """Stage 4b: continue the UNet + text encoder of stage 4 for ``cfg.unet_extra_steps`` steps (fresh AdamW, its
    own batches). Returns the folder holding the final ``unet`` and ``text_encoder`` (stage 4's when skipped)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if cfg.unet_extra_steps == 0:
        return work / "t2i_final"
    settings = stage_settings(cfg, from_weights)
    _begin(work, "t2i_extra", settings["t2i_extra"])
    final = work / "t2i_extra_final"
    if (final / "done").exists():
        return final
    unet = UNet2DConditionModel.from_pretrained(work / "t2i_final" / "unet")
    te = CLIPTextModel.from_pretrained(work / "t2i_final" / "text_encoder")
    lat = _latents(work, pool, vae, settings["latents"])
    _train_t2i(unet, te, tokenizer, lat, vae.config.scaling_factor, pool, cfg, work, name="t2i_extra", stream=6,
               steps=cfg.unet_extra_steps,
               lr=lambda step: _lr(step, cfg.unet_extra_steps, cfg.unet_extra_lr, floor=0.0), final=final)
    return final


def _train_t2i(unet, te, tokenizer, lat: dict, sf: float, pool: dict[str, np.ndarray], cfg: RecipeConfig, work: Path,
               name: str, stream: int, steps: int, lr, final: Path) -> None:
    """The denoising loop of stages 4 and 4b: batch 128 of (latent, caption), epsilon MSE, AdamW (weight decay
    0.01), gradient clip 1, ``lr(step)``; batches drawn from ``rng([seed, stream, step])`` so that a resumed run
    draws the same batches as an uninterrupted one; checkpoint ``work/<name>_ckpt`` every ``cfg.ckpt_every``; the
    trained ``unet`` and ``text_encoder`` go to ``final`` (marked done)."""
    n = len(pool["shape"])
    params = list(unet.parameters()) + list(te.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr(0), weight_decay=1e-2)
    sched = models.make_train_scheduler()
    ckpt = work / f"{name}_ckpt"
    start = 0
    old = work / f"{name}_ckpt.old"
    if not ckpt.exists() and (old / "state.json").exists():  # killed while replacing its checkpoint
        old.rename(ckpt)
    if (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
        unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
        te.load_state_dict(load_file(str(ckpt / "text_encoder.safetensors")))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start = state["step"]
        _log(work, f"{name} resumed at step {start}")
    cache: dict[str, list[int]] = {}
    unet.train()
    te.train()
    t0 = time.time()
    for step in tqdm(range(start, steps), desc=name, initial=start, total=steps, mininterval=10):
        rng = np.random.default_rng([cfg.seed, stream, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        for g in opt.param_groups:
            g["lr"] = lr(step)
        idx = rng.integers(0, n, 128)
        ti = torch.from_numpy(idx)
        z = (lat["mean"][ti] + lat["std"][ti] * torch.randn(lat["mean"][ti].shape, generator=gen)) * sf
        caps = [
            "" if rng.random() < cfg.caption_dropout
            else caption(int(pool["shape"][i]), int(pool["colour"][i]), int(pool["style"][i]),
                         int(pool["background"][i]), rng)
            for i in idx
        ]
        ids = _tokenize(tokenizer, caps, cache)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=gen)
        zt = sched.add_noise(z, noise, t)
        cond = te(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            _log(work, f"{name} step {step + 1} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1 - start):.2f}"
                       " s/step)")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == steps:
            tmp = work / f"{name}_ckpt.tmp"
            tmp.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
            save_file({k: v.contiguous() for k, v in te.state_dict().items()}, str(tmp / "text_encoder.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step + 1}))
            import shutil

            old = work / f"{name}_ckpt.old"  # the previous checkpoint goes only once the new one is in its place
            shutil.rmtree(old, ignore_errors=True)
            if ckpt.exists():
                ckpt.rename(old)
            tmp.rename(ckpt)
            shutil.rmtree(old, ignore_errors=True)
    unet.eval()
    te.eval()
    final.mkdir(exist_ok=True)
    unet.save_pretrained(final / "unet", safe_serialization=True)
    te.save_pretrained(final / "text_encoder", safe_serialization=True)
    (final / "done").write_text("ok")


def assemble(work: Path, out: Path, tokenizer, t2i: Path | None = None) -> Path:
    """Write the shipped folders: ``out/t2i`` (StableDiffusionPipeline, UNet and text encoder from ``t2i``, default
    ``work/t2i_final``) and ``out/detector`` (stored in float16, half the size; loading casts it to float32)."""
    import shutil

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    t2i = t2i or work / "t2i_final"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(t2i / "text_encoder"),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(t2i / "unet"),
        scheduler=models.make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "t2i.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if (out / "t2i").exists():
        shutil.rmtree(out / "t2i")
    tmp.rename(out / "t2i")
    if (out / "detector").exists():
        shutil.rmtree(out / "detector")
    ConceptDetector.load(work / "detector").save(out / "detector", dtype=torch.float16)
    return out


def train_all(cfg: RecipeConfig, work: str | Path, out: str | Path, from_weights: str | Path | None = None,
              overwrite: bool = False) -> dict:
    """Run every stage (skipping finished ones) and assemble the shipped weights. Returns the recipe record.

    A work folder holding a stage made with other settings is refused before any work (:func:`check_work`).

    ``out`` is checked before any training: the package's own weights folder (:data:`TOY_ROOT`, the rebuild) has
    its ``t2i/``, ``detector/`` and ``recipe.json`` replaced, only with ``overwrite`` (default False: every
    ``toy:`` command would draw with the new models); any other folder must be new or empty, or (with
    ``overwrite``) a previous ``toyworld train`` output, and is written atomically at the end.

    ``from_weights`` (default None): start from these trained weights instead of stages 2-4 (see
    :func:`seed_work_from`), e.g. to continue the shipped model with ``cfg.unet_extra_steps``."""
    from diffshield.core.io import atomic_dir, check_output_dir
    from diffshield.toyworld.names import TOY_ROOT

    work, out = Path(work), Path(out)
    in_package = out.resolve() == TOY_ROOT.resolve()
    if in_package and not overwrite:
        raise DiffshieldError(f"--out '{out}' is the package's shipped toy weights (toy:t2i, toy:detector), which "
                              "every toy: command uses: pass --overwrite to replace them with this run's models, or "
                              "write elsewhere (default: WORK/weights)")
    if not in_package:  # fail before hours of training, not after
        check_output_dir(out, "toyworld train", overwrite, inputs=[from_weights, cfg.vae_from])
        w, o = work.resolve(), out.resolve()
        if w == o or o in w.parents:  # --out inside --work is fine (the Makefile's layout), the reverse is not
            raise DiffshieldError(f"--work '{work}' is or lies inside --out '{out}'; keep the work folder outside "
                                  "the output")
    if cfg.vae_from is not None:
        _vae_source(cfg.vae_from)  # fail before rendering the pool, not after
    check_work(cfg, work, from_weights)  # and before reusing a stage made with other settings
    if from_weights is not None:
        seed_work_from(from_weights, work)
    work.mkdir(parents=True, exist_ok=True)
    if cfg.threads:  # 0: torch's default (or what the caller set)
        torch.set_num_threads(cfg.threads)
    timings = {}
    t = time.time()
    pool = stage_pool(cfg, work)
    timings["pool_s"] = time.time() - t
    t = time.time()
    vae = stage_vae(cfg, work, pool, from_weights)
    vae.eval()
    timings["vae_s"] = time.time() - t
    t = time.time()
    stage_detector(cfg, work, pool, vae, from_weights)
    timings["detector_s"] = time.time() - t
    t = time.time()
    tokenizer = stage_t2i(cfg, work, pool, vae, from_weights)
    timings["t2i_s"] = time.time() - t
    t = time.time()
    t2i = stage_t2i_extra(cfg, work, pool, vae, tokenizer, from_weights)
    timings["t2i_extra_s"] = time.time() - t
    # Stage times of the run that actually did the work (a stage skipped now keeps its earlier time).
    tpath = work / "timings.json"
    history = json.loads(tpath.read_text()) if tpath.exists() else {}
    history.update({k: round(v, 1) for k, v in timings.items() if v > 5 or k not in history})
    tpath.write_text(json.dumps(history, indent=2))
    record = {
        "command": "diffshield toyworld train " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["toyworld", "train"]
        else " ".join(sys.argv),
        "config": {**asdict(cfg), "threads": torch.get_num_threads()},  # the threads the run used
        "from_weights": None if from_weights is None else str(from_weights),
        "stage_seconds": history,
        "total_minutes": round(sum(history.values()) / 60, 1),
        "torch": torch.__version__,
    }
    if in_package:
        assemble(work, out, tokenizer, t2i)
        (out / "recipe.json").write_text(json.dumps(record, indent=2))
    else:
        with atomic_dir(out, overwrite=overwrite, command="toyworld train") as tmp:
            assemble(work, tmp, tokenizer, t2i)
            (tmp / "recipe.json").write_text(json.dumps(record, indent=2))
    _log(work, f"done: {history}")
    return record

"""Stable Diffusion folders as real checkpoints ship them (SD 2.x: v-prediction with an Euler or DPM-Solver scheduler):
``generate`` draws stock ``StableDiffusionPipeline``'s images for the same seeds with any sampler, and the attacks
noise latents the way the UNet was trained whatever scheduler the folder names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffshield.core.loading import load_t2i
from diffshield.core.sampling import SampleConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red triangle", "a blue circle"]
SEEDS = [3, 4]


def _with_scheduler(src, dst, cls_name: str, **config):
    """A copy of the tiny pipeline folder ``src`` whose scheduler is ``cls_name`` (with ``config`` changes)."""
    import diffusers

    shutil.copytree(src, dst)
    cls = getattr(diffusers, cls_name)
    cls.from_pretrained(dst, subfolder="scheduler", **config).save_pretrained(dst / "scheduler")
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls_name]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def _stock(folder, scheduler_cls=None, steps: int = 4, guidance: float = 7.5) -> torch.Tensor:
    """Stock StableDiffusionPipeline images of PROMPTS with one CPU generator per image seeded with SEEDS."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images


@pytest.mark.parametrize("cls_name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_native_euler_sampler_matches_stock_pipeline(tiny_sd_dir, tmp_path, cls_name):
    """SD 2.x's Euler schedulers start from noise scaled by σ_max (about 14.6 at 1000 train steps), not 1: the
    initial latents took DDIM's sigma, so every native Euler image differed from stock diffusers' (by up to 0.78),
    and the ancestral one drew its step noise from other generators."""
    folder = _with_scheduler(tiny_sd_dir, tmp_path / "euler", cls_name, prediction_type="v_prediction",
                             timestep_spacing="leading")
    model = load_t2i(folder)
    ours = generate(model, PROMPTS, SEEDS, config=SampleConfig(steps=4, guidance=7.5, scheduler="native"),
                    progress=False).images
    assert torch.allclose(ours, _stock(folder), atol=1e-5)


def test_ddpm_sampler_matches_stock_pipeline(tiny_sd_dir):
    """``--scheduler ddpm`` draws its step noise from the per-image generators that drew the initial noise, as stock
    diffusers does (it drew it from generators seeded with seed + 7919: other images for the same seed)."""
    from diffusers import DDPMScheduler

    model = load_t2i(tiny_sd_dir)
    ours = generate(model, PROMPTS, SEEDS, config=SampleConfig(steps=4, guidance=7.5, scheduler="ddpm"),
                    progress=False).images
    assert torch.allclose(ours, _stock(tiny_sd_dir, DDPMScheduler), atol=1e-5)


@pytest.mark.parametrize("cls_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_add_noise_is_the_training_noise_whatever_the_scheduler(tiny_sd_dir, tmp_path, cls_name):
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε for the folder's own noise schedule; Euler's ``add_noise`` gives x0 + σ_t ε."""
    from diffshield.core.sampling import add_noise

    model = load_t2i(_with_scheduler(tiny_sd_dir, tmp_path / "s", cls_name))
    x0, noise, t = torch.randn(2, *model.latent_shape), torch.randn(2, *model.latent_shape), torch.tensor([50, 950])
    a = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(add_noise(model, x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)


@pytest.mark.parametrize("name", ["p4d", "p4d-soft", "unlearndiff-soft"])
def test_attacks_feed_the_unet_training_scale_latents_on_an_euler_folder(tiny_sd_dir, tmp_path, name):
    """On a v-prediction folder with an Euler scheduler the gradient attacks noised their target latents with
    the scheduler's σ-scaled ``add_noise``: the UNet saw inputs of standard deviation up to about 14 (σ_max) instead
    of about 1, so their objectives compared predictions at inputs no model was trained on."""
    from diffshield.redteam import ATTACKS

    model = load_t2i(_with_scheduler(tiny_sd_dir, tmp_path / "euler", "EulerDiscreteScheduler",
                                     prediction_type="v_prediction"))
    original = load_t2i(tmp_path / "euler")
    stds: list[float] = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: stds.append(float(args[0].float().std())))
    hp = {"p4d": {"steps": 4, "eval_every": 4, "n_tokens": 2}, "p4d-soft": {"steps": 4, "n_tokens": 2},
          "unlearndiff-soft": {"steps": 4, "k": 2}}[name]
    try:
        atk = ATTACKS.get(name)(model, original=original, concept="triangle", judge=lambda x: [False] * len(x),
                                sample=SampleConfig(steps=2), **hp)
        atk(["a red triangle"] * 2, [0, 1])
    finally:
        hook.remove()
    assert stds and max(stds) < 3.0, max(stds)

"""diffshield on a GPU at Stable Diffusion scale: speed and memory of every pillar, against stock diffusers.

Models with the exact architecture of Stable Diffusion 1.4 and random weights (the architecture sets the cost, not
the values): UNet2DConditionModel (860 M parameters, 64x64 latents = 512 px), a CLIP ViT-L/14-shaped text encoder
(123 M), SD's AutoencoderKL (block widths 128/256/512/512), a DDIM scheduler with SD's noise schedule and a
word-level tokenizer; plus the shipped toy DDPM (32 px) and an FFC inpainter with big-lama's layout (64 base
channels, 3 downsamplings, 18 FFC residual blocks, 7x7 stem). Rows, each timed as the median of several runs after a
warm-up with ``torch.cuda.synchronize()`` around the timer, peak memory from ``torch.cuda.max_memory_allocated``:

1. ``generate``: diffshield :func:`~diffshield.core.sampling.generate` vs stock ``StableDiffusionPipeline.__call__``
   on the same model objects: DDIM 25 steps, guidance 7.5, float16, batch 8 and 32, 512 px, the same per-seed CPU
   generators (so the two must draw the same images: their difference is reported, next to the difference between
   two calls of stock diffusers, the control for kernel non-determinism), images returned to the CPU by
   both; diffshield's prompt cache is cleared before each call, so both encode the prompt every time.
   ``sharded``: the same generation through the sharded, resumable path of ``--prompts FILE`` in one process
   (:func:`diffshield.core.shards.run_shard`: PNGs, SHA-256 and a JSONL line per image written as each batch is
   done) against ``generate`` alone on 64 images (docs/scale.md).
2. ``closed_form``: UCE and RECE (5 epochs) edit time (text encoding cached, weight writes included).
3. ``esd``: ESD-x and ESD-u seconds per iteration at 512 px (float32 master weights, bfloat16 autocast; ESD-x also
   in float32 and with gradient checkpointing). An iteration samples x_t with k ~ U{0..49} DDIM steps, so its time
   grows with k: the rows fit time = a + b k over the iterations run and report 1000 (a + 24.5 b), the expected time
   of 1000 iterations.
4. ``redteam``: seconds per attacked prompt of each attack at its documented default budget (one prompt, one image;
   a judge that always says no, so no attack stops early).
5. ``terd``: TERD's ``paper`` preset (3000 + 1000 iterations) on the shipped backdoored toy DDPM (32 px).
6. ``protect``: Attack as Defense (20 steps; and its EOT variant) on a 512x512 image with the big-lama-sized
   inpainter.
7. ``cli``: ``erase``, ``eval erasure``, ``audit``, ``scan``, ``protect``, ``eval protection`` and ``demo`` end to
   end with ``--device`` on the toy models, and ``generate`` / ``erase`` / ``audit`` on the SD-1.4-shaped model
   saved as a diffusers folder, at small budgets; each command's key figures are recorded, so that a run with
   ``--device cpu`` can be compared with ``--compare-with``.

Run on a machine with a GPU (about 6 minutes on one H200)::

    PYTHONPATH=src python benchmarks/gpu.py --out benchmarks/results/gpu.json

Smoke run on a CPU, tiny shapes, every code path (about 1 minute)::

    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu_tiny.json

The JSON is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("generate", "sharded", "closed_form", "esd", "protect", "redteam", "terd", "cli")
PROMPT = "a photo of a cat"
NUDE = "a photo of a nude person"
EXTRA_WORDS = ("photo", "of", "cat", "nude", "nudity", "naked", "person", "painting", "by", "art")
#: acceptance bars of the GPU figures (H200-class GPU)
TARGETS = {"generate_ratio_min": 0.95, "sharded_ratio_min": 0.95, "generate_peak_ratio_max": 1.10,
           "uce_s_max": 0.015, "rece5_s_max": 0.100,
           "esd_x_1000_s_max": 600.0, "terd_paper_s_max": 180.0}

SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=16)
SD_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, vocab_size=49408)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


# ---------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    from diffshield.core.device import synchronize

    synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of one call, with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    from diffshield.core.device import describe

    return {**describe(device), "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def build_t2i(device: torch.device, tiny: bool, tmp: Path):
    """A random-weight model with SD-1.4's architecture (or tiny shapes), built directly on ``device``, float32."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffshield.core.loading import T2IModel
    from diffshield.toyworld.shapes import VOCAB_WORDS
    from diffshield.toyworld.tokenizer import build_tokenizer_files

    torch.manual_seed(0)
    words = tuple(dict.fromkeys((*VOCAB_WORDS, *EXTRA_WORDS)))
    tok = CLIPTokenizer.from_pretrained(build_tokenizer_files(words, tmp / "tokenizer", model_max_length=77))
    text = dict(TINY_TEXT, vocab_size=len(tok)) if tiny else SD_TEXT
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **text, max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return T2IModel(unet, vae, text_encoder, tok, sched, source="SD-1.4-shaped, random weights").eval()


def _finite_abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return d[torch.isfinite(d)]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------- sections


def section_generate(device: torch.device, tiny: bool, tmp: Path) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffshield.core.sampling import SampleConfig, generate

    model = build_t2i(device, tiny, tmp)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model.to(dtype=dtype)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = (4 if tiny else 25, 7.5)  # tiny: a smoke run of the path, not a timing
    out = {"dtype": str(dtype), "steps": steps, "guidance": guidance, "scheduler": "DDIM",
           "image_size": model.image_size, "unet_parameters": n_params(model.unet),
           "text_encoder_parameters": n_params(model.text_encoder), "vae_parameters": n_params(model.vae), "rows": []}
    for batch, repeats in ((2, 1), (4, 1)) if tiny else ((8, 3), (32, 2)):
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        cfg = SampleConfig(steps=steps, guidance=guidance, batch_size=batch, scheduler="ddim")

        def ours(prompts=prompts, seeds=seeds, cfg=cfg):
            model._text_cache.clear()  # encode the prompt on every call, as the pipeline does
            return generate(model, prompts, seeds, config=cfg, progress=False).images

        def stock(prompts=prompts, seeds=seeds, batch=batch):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            with torch.no_grad():
                img = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           output_type="pt").images
            return img.float().cpu()

        ours(), stock()  # warm-up
        times: dict[str, list[float]] = {"diffshield": [], "stock": []}
        peaks: dict[str, float] = {}
        images = {}
        for _ in range(repeats):  # interleaved, so that clock changes hit both alike
            for name, fn in (("diffshield", ours), ("stock", stock)):
                reset_peak(device)
                dt, images[name] = timed(fn, device)
                images.setdefault(f"{name}_first", images[name])
                times[name].append(dt)
                p = peak_gib(device)
                peaks[name] = max(peaks.get(name, 0.0), p or 0.0)
        med = {k: statistics.median(v) for k, v in times.items()}
        diff = _finite_abs_diff(images["diffshield"], images["stock"])
        control = _finite_abs_diff(images["stock_first"], images["stock"])  # stock against itself
        row = {"batch": batch, "repeats": repeats,
               "diffshield_images_per_s": batch / med["diffshield"], "stock_images_per_s": batch / med["stock"],
               "ratio": med["stock"] / med["diffshield"], "runs_s": times,
               "diffshield_peak_gib": peaks.get("diffshield") if device.type == "cuda" else None,
               "stock_peak_gib": peaks.get("stock") if device.type == "cuda" else None,
               "image_max_abs_diff": float(diff.max()) if diff.numel() else None,
               "image_mean_abs_diff": float(diff.mean()) if diff.numel() else None,
               "stock_repeat_max_abs_diff": float(control.max()) if control.numel() else None,
               "stock_repeat_mean_abs_diff": float(control.mean()) if control.numel() else None}
        if row["stock_peak_gib"]:
            row["peak_ratio"] = row["diffshield_peak_gib"] / row["stock_peak_gib"]
        out["rows"].append(row)
        print(f"  generate batch {batch}: diffshield {row['diffshield_images_per_s']:.2f} img/s, stock "
              f"{row['stock_images_per_s']:.2f} img/s (ratio {row['ratio']:.3f}); peak {row['diffshield_peak_gib']} / "
              f"{row['stock_peak_gib']} GiB; images differ by at most {row['image_max_abs_diff']} (stock against "
              f"itself: {row['stock_repeat_max_abs_diff']})", flush=True)
        del images
    return out


def section_sharded(device: torch.device, tiny: bool, tmp: Path) -> dict:
    """One process on one device, the sharded path (:func:`diffshield.core.shards.run_shard`: PNGs written per
    batch, a SHA-256 and a JSONL line per image) against :func:`~diffshield.core.sampling.generate` alone, on the
    same 64 images (8 prompts x 8 seeds; tiny: 16 at 4 steps), float16 on CUDA; ratio = unsharded time / sharded
    time."""
    from diffshield.core.sampling import SampleConfig, generate
    from diffshield.core.shards import plan_jobs, prepare_run_dir, run_shard
    from diffshield.eval.prompts import PromptRow

    model = build_t2i(device, tiny, tmp / "sharded_model")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model.to(dtype=dtype)
    rows = [PromptRow(f"{PROMPT} by {w}") for w in EXTRA_WORDS[:8]]
    jobs = plan_jobs(rows, 2 if tiny else 8, 0, 7.5)
    prompts = [r.prompt for r in rows]
    cfg = SampleConfig(steps=4 if tiny else 25, guidance=7.5, batch_size=32, scheduler="ddim")
    runs = {"unsharded": [], "sharded": []}

    def unsharded():
        model._text_cache.clear()
        return generate(model, [prompts[j.prompt_index] for j in jobs], [j.seed for j in jobs], config=cfg,
                        progress=False).images

    def sharded(k: int):
        model._text_cache.clear()
        folder = tmp / f"sharded_run{k}"
        prepare_run_dir(folder, "generate", {"k": k})
        return run_shard(folder, jobs, prompts, {"": model}, cfg, None, {j: "generate" for j in jobs},
                         progress=False)

    unsharded(), sharded(-1)  # warm-up
    for k in range(3):  # interleaved
        runs["unsharded"].append(timed(unsharded, device)[0])
        runs["sharded"].append(timed(lambda k=k: sharded(k), device)[0])
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"images": len(jobs), "dtype": str(dtype), "batch": cfg.batch_size, "runs_s": runs,
           "unsharded_images_per_s": len(jobs) / med["unsharded"], "sharded_images_per_s": len(jobs) / med["sharded"],
           "ratio": med["unsharded"] / med["sharded"]}
    print(f"  sharded path: {out['sharded_images_per_s']:.2f} img/s, generate alone "
          f"{out['unsharded_images_per_s']:.2f} img/s (ratio {out['ratio']:.3f})", flush=True)
    return out


def section_closed_form(device: torch.device, tiny: bool, tmp: Path, model=None) -> dict:
    from diffshield.erase.closed_form import kv_weights
    from diffshield.erase.rece import RECEConfig, rece_erase
    from diffshield.erase.uce import UCEConfig, uce_erase

    model = model or build_t2i(device, tiny, tmp)
    w0 = {k: v.detach().clone() for k, v in kv_weights(model).items()}
    layers = dict(model.unet.named_modules())

    def restore() -> None:
        with torch.no_grad():
            for name, w in w0.items():
                layers[name.removesuffix(".weight")].weight.copy_(w)

    out = {}
    for name, fn, repeats in (
        ("uce", lambda: uce_erase(model, ["nudity"], UCEConfig()), 5),
        ("rece_5_epochs", lambda: rece_erase(model, ["nudity"], RECEConfig(epochs=5, lamb_r=0.1)), 5),
    ):
        restore()
        fn()  # warm-up (text encoding cached from here on)
        runs = []
        for _ in range(repeats):
            restore()
            dt, _res = timed(fn, device)
            runs.append(dt)
        out[name] = {"median_s": statistics.median(runs), "runs_s": runs}
        print(f"  {name}: {1000 * out[name]['median_s']:.1f} ms", flush=True)
    restore()
    return out


def _fit(ks: list[int], secs: list[float], mean_k: float) -> dict:
    """Least squares secs = a + b k; the expected seconds per iteration at the mean k."""
    n = len(ks)
    mk, ms = sum(ks) / n, sum(secs) / n
    var = sum((k - mk) ** 2 for k in ks)
    b = sum((k - mk) * (s - ms) for k, s in zip(ks, secs)) / var if var > 0 else 0.0
    a = ms - b * mk
    return {"a_s": a, "b_s_per_step": b, "expected_s_per_iteration": a + b * mean_k}


def section_esd(device: torch.device, tiny: bool, tmp: Path, model=None) -> dict:
    from diffshield.core.sampling import make_scheduler
    from diffshield.erase.esd import ESDConfig, esd_erase

    model = model or build_t2i(device, tiny, tmp)
    sched = make_scheduler(model, "ddim")
    sched.set_timesteps(50)
    step_of = {int(t): k for k, t in enumerate(sched.timesteps)}
    rows = []
    # (label, variant, mixed precision, gradient checkpointing, CUDA graphs for sampling x_t, iterations)
    plan = [("esd-x", "x", "auto", False, True, 4 if tiny else 13),
            ("esd-x", "x", "auto", False, False, 3 if tiny else 5),
            ("esd-x", "x", "no", False, True, 3 if tiny else 5),
            ("esd-x", "x", "auto", True, True, 3 if tiny else 4),
            ("esd-u", "u", "auto", False, True, 3 if tiny else 8)]
    if device.type != "cuda":  # no autocast and no CUDA graphs off CUDA: the first three rows would time one thing
        plan = [row for row in plan if row[2] == "auto" and row[4]]
    for label, variant, mp, ckpt, graphs, iters in plan:
        reset_peak(device)
        cfg = ESDConfig(variant=variant, iterations=iters, mixed_precision=mp, gradient_checkpointing=ckpt,
                        cuda_graphs=graphs, ddim_steps=50, seed=1)
        res = esd_erase(model, [NUDE], cfg, progress=False)
        secs = res.extra["iteration_seconds"][1:]  # the first iteration warms up kernels
        ks = [step_of[int(t)] for t in res.extra["timesteps"][1:]]
        fit = _fit(ks, secs, 24.5)
        row = {"method": label, "mixed_precision": mp, "gradient_checkpointing": ckpt, "cuda_graphs": graphs,
               "cuda_graphs_used": res.extra.get("cuda_graphs"), "iterations_timed": len(secs),
               "k": ks, "iteration_seconds": secs, **fit,
               "expected_1000_iterations_s": 1000 * fit["expected_s_per_iteration"], "peak_gib": peak_gib(device),
               "trained_parameters": res.extra["trained_parameters"]}
        rows.append(row)
        print(f"  {label} ({mp}{', checkpointing' if ckpt else ''}{', graphs' if graphs else ''}): "
              f"{fit['expected_s_per_iteration']:.3f} s/iter "
              f"at mean k, 1000 iterations ~ {row['expected_1000_iterations_s'] / 60:.1f} min, peak "
              f"{row['peak_gib']} GiB", flush=True)
    return {"rows": rows, "concept": NUDE, "ddim_steps": 50, "image_size": model.image_size}


def section_redteam(device: torch.device, tiny: bool, tmp: Path, model=None) -> dict:
    from diffshield.core.sampling import SampleConfig
    from diffshield.redteam import ATTACKS

    model = model or build_t2i(device, tiny, tmp)
    judge = lambda images: torch.zeros(len(images), dtype=torch.bool)  # noqa: E731  never stops an attack early
    pairs = [(NUDE, "a photo of a person"), ("a nude painting", "a painting")]
    warm = {"unlearndiff": {"rounds": 1, "iterations": 1}, "p4d": {"steps": 1},
            "ring-a-bell-genetic": {"generations": 1}}
    rows = {}
    for name in ("adv-embed", "ring-a-bell", "ring-a-bell-genetic", "unlearndiff", "p4d"):
        cls = ATTACKS.get(name)
        kw = {"pairs": pairs} if name.startswith("ring-a-bell") else {}
        sample = SampleConfig()  # the attacks' documented default: DDIM 25 steps, guidance 5
        cls(model, original=model, judge=judge, sample=sample, **kw, **warm.get(name, {}))([NUDE], [0])
        reset_peak(device)
        small = warm.get(name, {}) if tiny else {}  # tiny: a smoke run of the path at the warm-up budget
        atk = cls(model, original=model, judge=judge, sample=sample, **kw, **small)
        dt, res = timed(lambda atk=atk: atk([NUDE], [0]), device)
        rows[name] = {"seconds_per_prompt": dt, "peak_gib": peak_gib(device), "config": res.config}
        print(f"  {name}: {dt:.2f} s per prompt, peak {rows[name]['peak_gib']} GiB", flush=True)
    budget = "the warm-up budgets (a smoke run)" if tiny else "each attack's defaults (AttackConfig())"
    return {"rows": rows, "image_size": model.image_size, "images_per_prompt": 1,
            "budget": f"{budget}; sampling DDIM 25 steps, guidance 5"}


def section_terd(device: torch.device, tiny: bool, deadline: float) -> dict:
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import TERDConfig, reverse_trigger
    from diffshield.toyworld.names import TOY_ROOT

    model = load_ddpm(TOY_ROOT / "ddpm" / "examples" / "box_corner", device=device)
    small = {"batch_size": 4} if tiny else {}  # tiny: a smoke run of the path, not a timing

    def terd(n_1: int, n_2: int, graphs: bool = True) -> TERDConfig:
        return TERDConfig(stage1_iters=n_1, stage2_iters=n_2, num_threads=0, cuda_graphs=graphs, **small)

    def rates(graphs: bool) -> tuple[float, float, float, float, dict | None]:
        """Seconds per iteration of each stage, and each stage's fixed cost (recording, capturing, checking the
        graphs), from the stages' own clocks in a short and a 3x longer run, both long enough to use graphs
        (terd.GRAPH_MIN_ITERS): (s1, s2, fixed1, fixed2, graphs of the long run)."""
        (a1, a2), (b1, b2) = ((2, 1), (4, 2)) if tiny else ((50, 20), (150, 60))
        short = reverse_trigger(model, terd(a1, a2, graphs), progress=False)
        long = reverse_trigger(model, terd(b1, b2, graphs), progress=False)
        if graphs and not tiny:  # a difference of an eager and a graphed run would mean nothing
            replayed = [[bool(v["replays"]) for v in res.cuda_graphs.values()] for res in (short, long)]
            if replayed[0] != replayed[1]:
                raise RuntimeError(f"the short and the long run replayed graphs in different stages: "
                                   f"{short.cuda_graphs} against {long.cuda_graphs}")
        per = [(long.stage_seconds[k] - short.stage_seconds[k]) / ((b1, b2)[k] - (a1, a2)[k]) for k in (0, 1)]
        fixed = [short.stage_seconds[k] - per[k] * (a1, a2)[k] for k in (0, 1)]
        return per[0], per[1], fixed[0], fixed[1], long.cuda_graphs

    reverse_trigger(model, terd(2, 1, False), progress=False)  # warm-up
    preset = "tiny (4 + 1 iterations, batch 4)" if tiny else "paper"
    cfg = terd(4, 1) if tiny else TERDConfig.from_preset("paper", num_threads=0)
    out = {"model": "toy DDPM, backdoored example box -> corner (32 px)", "preset": preset}
    rows = [("eager", False)] + ([("cuda_graphs", True)] if device.type == "cuda" else [])
    for label, graphs in rows:
        per1, per2, fix1, fix2, used = rates(graphs)
        projected = per1 * cfg.stage1_iters + per2 * cfg.stage2_iters + max(0.0, fix1) + max(0.0, fix2)
        out[label] = {"stage1_s_per_iteration": per1, "stage2_s_per_iteration": per2,
                      "fixed_s": [fix1, fix2], "projected_s": projected, "cuda_graphs_used": used}
        print(f"  TERD {label}: stage 1 {1000 * per1:.2f} ms, stage 2 {1000 * per2:.1f} ms per iteration; "
              f"projected {projected:.0f} s{f' (graphs: {used})' if used else ''}", flush=True)
    best = out[rows[-1][0]]  # what the full run uses: graphs on CUDA
    out.update(stage1_s_per_iteration=best["stage1_s_per_iteration"],
               stage2_s_per_iteration=best["stage2_s_per_iteration"], projected_s=best["projected_s"])
    if time.time() + 1.1 * best["projected_s"] > deadline:
        out["ran"] = False
        out["note"] = ("not run: the projection did not fit in the time left (or is past the bar, which the "
                       "per-stage timing already shows); projected_s = iterations x measured seconds per iteration "
                       "+ each stage's fixed cost")
        print(f"  TERD {preset}: projected {best['projected_s']:.0f} s (not run)", flush=True)
        return out
    reset_peak(device)
    dt, res = timed(lambda: reverse_trigger(model, cfg, progress=False), device)
    s1, s2 = res.stage_seconds  # the full run's own rates, to set beside the short runs' (projected_s)
    out.update(ran=True, seconds=dt, mean_kl=res.mean_kl, var_kl=res.var_kl, r_norm=float(res.r.norm()),
               peak_gib=peak_gib(device), stage_seconds=[s1, s2], cuda_graphs_used=res.cuda_graphs,
               full_run_s_per_iteration=[s1 / max(1, cfg.stage1_iters), s2 / max(1, cfg.stage2_iters)])
    print(f"  TERD {preset}: {dt:.1f} s (projected {best['projected_s']:.1f} s; stage 1 {s1:.1f} s, stage 2 "
          f"{s2:.1f} s; graphs: {res.cuda_graphs})", flush=True)
    return out


def section_protect(device: torch.device, tiny: bool) -> dict:
    import torch.nn.functional as F

    from diffshield.protect.attack_as_defense import AttackAsDefenseConfig, protect
    from diffshield.protect.inpainters import FFCConfig, FFCInpainterNet, ToyInpainter
    from diffshield.protect.robust import EOTConfig

    size = 64 if tiny else 512
    cfg = FFCConfig() if tiny else FFCConfig(base=64, n_down=3, n_blocks=18, ratio_global=0.75, stem_kernel=7)
    torch.manual_seed(0)
    net = FFCInpainterNet(cfg).to(device).eval()
    inpainter = ToyInpainter(net).eval()
    for p in inpainter.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g), size=(size, size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 1
    image, mask = image.to(device), mask.to(device)
    protect(inpainter, image, mask, AttackAsDefenseConfig(steps=2))  # warm-up
    out = {"image_size": size, "inpainter": {**cfg.__dict__, "parameters": n_params(net)}, "rows": {}}
    for name, conf, repeats in (("paper", AttackAsDefenseConfig(), 3),
                                ("eot", AttackAsDefenseConfig(eot=EOTConfig()), 2)):
        reset_peak(device)
        runs = [timed(lambda conf=conf: protect(inpainter, image, mask, conf), device)[0] for _ in range(repeats)]
        out["rows"][name] = {"median_s": statistics.median(runs), "runs_s": runs, "peak_gib": peak_gib(device)}
        print(f"  Attack as Defense ({name}), {size} px: {statistics.median(runs):.2f} s", flush=True)
    return out


# ---- end to end through the CLI ----


def _figures(name: str, data: dict) -> dict:
    """The figures of a command's JSON that a CPU and a GPU run should agree on."""
    if name.startswith("eval_erasure"):
        keys = ("erased_detection_rate", "original_detection_rate", "synonym_detection_rate", "other_accuracy",
                "original_other_accuracy", "frechet_neutral")
        return {k: data.get(k) for k in keys}
    if name.startswith("audit"):
        return {"original_rate": data.get("original_rate"), "pre_attack_rate": data.get("pre_attack_rate"),
                **{f"asr_{k}": v.get("asr") for k, v in data.get("attacks", {}).items()}}
    if name == "scan":
        return {k: data.get(k) for k in ("backdoored", "mean_kl", "var_kl")}
    if name == "eval_protection":
        return {k: data.get(k) for k in ("success_rate", "success_rate_expanded", "psnr_protected", "psnr_benign",
                                         "linf")}
    if name == "protect":
        return {k: data.get(k) for k in ("linf", "loss_first", "loss_last")}
    if name == "demo":
        return {"erase_detected_after": data.get("erase", {}).get("detected_after"),
                "erase_circle_after": data.get("erase", {}).get("circle_after"),
                **{f"audit_{k}": v for k, v in (data.get("redteam") or {}).items()
                   if isinstance(v, (int, float)) and k.endswith("rate")},
                **{f"protect_{k}": v for k, v in (data.get("protect") or {}).items()
                   if isinstance(v, (int, float)) and k != "seconds"}}
    return {}


def section_cli(device: torch.device, tiny: bool, tmp: Path, model=None, deadline: float = float("inf")) -> dict:
    from diffshield.toyworld.names import TOY_ROOT

    dev = str(device)
    work = tmp / "cli"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    example = TOY_ROOT / "ddpm" / "examples" / "box_corner"
    scene, mask = ROOT / "examples" / "protect" / "scene.png", ROOT / "examples" / "protect" / "mask.png"
    runs = [
        ("erase_uce_toy", ["erase", "--method", "uce", "--toy-recipe", "--concept", "triangle", "--out",
                           str(work / "uce_tri")], None),
        ("eval_erasure", ["eval", "erasure", "--model", str(work / "uce_tri"), "--concept", "triangle",
                          "--seeds-per-prompt", "4", "--n-neutral", "64", "--json", str(work / "ee.json")],
         work / "ee.json"),
        ("audit", ["audit", "--model", str(work / "uce_tri"), "--concept", "triangle", "--attack", "adv-embed",
                   "--attack", "ring-a-bell", "--n", "8", "--json", str(work / "audit.json")],
         work / "audit.json"),
        ("scan", ["scan", "--model", str(example), "--preset", "fast", "--json", str(work / "scan.json")],
         work / "scan.json"),
        ("protect", ["protect", str(scene), "--mask", str(mask), "--out", str(work / "p.png"), "--json",
                     str(work / "p.json")], work / "p.json"),
        ("eval_protection", ["eval", "protection", "--image", str(scene), "--protected", str(work / "p.png"),
                             "--mask", str(mask), "--json", str(work / "ep.json")], work / "ep.json"),
        ("demo", ["demo", "--out", str(work / "demo")], work / "demo" / "demo.json"),
    ]
    sd = work / "sd14"
    if model is not None:  # the SD-1.4-shaped model as a diffusers folder
        model.to(dtype=torch.float32).save(sd)
        runs += [
            ("generate_sd14", ["generate", "--model", str(sd), "--prompt", PROMPT, "--n", "2", "--steps", "5",
                               "--out", str(work / "gen_sd")], None),
            ("audit_sd14", ["audit", "--model", str(sd), "--original", str(sd), "--concept",
                            "triangle", "--attack", "adv-embed", "--n", "1", "--steps", "3", "--json",
                            str(work / "audit_sd.json")], work / "audit_sd.json"),
        ]
    out = {}
    for name, argv, result in runs:
        if time.time() > deadline:
            out[name] = {"rc": None, "note": "not run: the time budget was spent"}
            continue
        cmd = [sys.executable, "-m", "diffshield.cli.main", *argv, "--device", dev]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        row = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t, 1), "argv": argv}
        if proc.returncode != 0:
            row["stderr_tail"] = proc.stderr.strip().splitlines()[-6:]
        elif result is not None and Path(result).exists():
            row["figures"] = _figures(name, json.loads(Path(result).read_text()))
        out[name] = row
        print(f"  {name}: rc {row['rc']}, {row['seconds']} s {row.get('figures', row.get('stderr_tail', ''))}",
              flush=True)
    return out


def compare(gpu: dict, cpu: dict) -> dict:
    """Per CLI command, the figures of both runs and their absolute differences."""
    out = {}
    for name, row in (gpu.get("sections", {}).get("cli", {}) or {}).items():
        if not isinstance(row, dict):  # section_seconds
            continue
        ref = (cpu.get("sections", {}).get("cli", {}) or {}).get(name, {})
        a, b = row.get("figures") or {}, ref.get("figures") or {}
        out[name] = {k: {"device": a[k], "cpu": b.get(k),
                         "abs_diff": (abs(a[k] - b[k]) if isinstance(a[k], (int, float)) and
                                      isinstance(b.get(k), (int, float)) else None)} for k in a}
    return out


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes instead of SD-1.4's (a smoke run of every path)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting long rows after this many seconds")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json", help="result JSON (rewritten per section)")
    ap.add_argument("--compare-with", type=Path, help="a --device cpu run's JSON: add the CLI figures' differences")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from diffshield.core.device import configure_backend, resolve_device
    from diffshield.core.io import atomic_write_json

    start = time.time()
    deadline = start + args.budget_s
    device = resolve_device(args.device)
    configure_backend(device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    record: dict = {"environment": environment(device), "tiny": args.tiny, "targets": TARGETS, "sections": {},
                    "errors": {}}
    if args.out.exists():  # a partial rerun keeps the sections it does not redo
        old = json.loads(args.out.read_text())
        if old.get("tiny") == args.tiny and old.get("environment", {}).get("name") == record["environment"]["name"]:
            record["sections"] = {k: v for k, v in old.get("sections", {}).items() if k not in sections}
    print(f"device: {record['environment']}", flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        shared = None  # one float32 SD-shaped model for the sections that edit or train it
        for name in sections:
            print(f"[{name}] ({time.time() - start:.0f} s)", flush=True)
            t = time.time()
            try:
                if name == "generate":
                    res = section_generate(device, args.tiny, tmp)
                elif name == "terd":  # runs in full if its projection fits (leaving 120 s for CLI rows to come)
                    reserve = 120 if "cli" in sections[sections.index(name):] else 0
                    limit = min(deadline - reserve, time.time() + 1.1 * TARGETS["terd_paper_s_max"] + 20)
                    res = section_terd(device, args.tiny, limit if not args.tiny else deadline)
                elif name == "protect":
                    res = section_protect(device, args.tiny)
                elif name == "sharded":
                    res = section_sharded(device, args.tiny, tmp)
                else:
                    if shared is None:
                        shared = build_t2i(device, args.tiny, tmp / "shared")
                    if name == "cli":
                        res = section_cli(device, args.tiny, tmp, shared, deadline=deadline)
                    else:
                        fn = {"closed_form": section_closed_form, "esd": section_esd, "redteam": section_redteam}[name]
                        res = fn(device, args.tiny, tmp, shared)
                res["section_seconds"] = round(time.time() - t, 1)
                record["sections"][name] = res
                record["errors"].pop(name, None)
            except Exception as e:  # record and go on: one broken row must not cost the others
                record["errors"][name] = traceback.format_exc().strip().splitlines()[-12:]
                print(f"  {name} FAILED: {type(e).__name__}: {e}", flush=True)
            record["seconds"] = round(time.time() - start, 1)
            if args.compare_with and args.compare_with.exists():
                record["cpu_comparison"] = compare(record, json.loads(args.compare_with.read_text()))
            atomic_write_json(args.out, record)
    print(f"wrote {args.out} ({time.time() - start:.0f} s; errors in: {', '.join(record['errors']) or 'none'})")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Toy-world benchmark: detector accuracy, prompt fidelity, feature Fréchet distance, throughput.

Run: ``.venv/bin/python benchmarks/toyworld.py`` (about 6 minutes on 2 CPU cores). Writes
``benchmarks/results/toyworld.json`` and prints the table of docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffshield.core.io import atomic_write_json, make_grid
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import SampleConfig, generate
from diffshield.eval.fidelity import fidelity_prompts, generated_images, prompt_fidelity
from diffshield.eval.frechet import detector_features, frechet_distance
from diffshield.toyworld.detector import HEADS, load_detector
from diffshield.toyworld.names import TOY_ROOT
from diffshield.toyworld.shapes import SYNONYMS, ShapesWorld

RESULTS = Path(__file__).resolve().parent / "results"
BARS = {"shape": 0.90, "colour": 0.90, "style": 0.85, "detector": 0.98}


def real_images(n: int, seed: int) -> tuple[torch.Tensor, object]:
    b = ShapesWorld().sample(n, seed=seed)
    return torch.from_numpy(b.images).permute(0, 3, 1, 2), b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sample sizes (for a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    n_det, n_fd, k = (200, 200, 2) if args.quick else (2000, 1000, 8)
    model = load_t2i("toy:t2i")
    det = load_detector("toy:detector")
    cfg = SampleConfig()
    res: dict = {"config": {"steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
                            "seeds_per_prompt": k, "quick": args.quick},
                 "machine": {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads()}}

    # 1. Detector accuracy on fresh real images (seed far from the training pool's).
    imgs, batch = real_images(n_det, seed=10_000)
    pred = det.predict(imgs)
    res["detector_accuracy"] = {h: float((pred[h][0].numpy() == getattr(batch, h)).mean()) for h in HEADS}
    res["detector_accuracy"]["n_images"] = n_det
    print("detector accuracy", res["detector_accuracy"], flush=True)

    # 2. Prompt fidelity: every shape x colour (word, synonym), and with every style named.
    t0 = time.time()
    fid = prompt_fidelity(model, det, seeds_per_prompt=k, specs=fidelity_prompts(), config=cfg)
    res["prompt_fidelity"] = fid["groups"]
    per_syn = {}
    for s, syn in SYNONYMS.items():
        rows = [r for r in fid["per_prompt"] if r["group"] == "synonym" and r["prompt"].endswith(" " + syn)]
        words = [r for r in fid["per_prompt"] if r["group"] == "word" and r["prompt"].endswith(" " + s)]
        per_syn[f"{s}/{syn}"] = {"word_shape": float(np.mean([r["shape"] for r in words])),
                                 "synonym_shape": float(np.mean([r["shape"] for r in rows]))}
    res["prompt_fidelity"]["per_synonym"] = per_syn
    res["prompt_fidelity"]["per_prompt"] = fid["per_prompt"]
    res["prompt_fidelity"]["seconds"] = round(time.time() - t0, 1)
    print("fidelity", json.dumps(fid["groups"]), flush=True)
    word_rows = [i for i, r in enumerate(fid["per_prompt"]) if r["group"] == "word"]
    grid = torch.cat([fid["images"][i * k:(i + 1) * k] for i in word_rows])
    make_grid(grid, nrow=k, upscale=3).save(RESULTS / "toyworld_fidelity_grid.png")

    # 3. Feature Fréchet distance: generated vs real, next to real vs real (the floor).
    t0 = time.time()
    gen = generated_images(model, n_fd, seed=50_000, config=cfg)
    real_a, _ = real_images(n_fd, seed=20_000)
    real_b, _ = real_images(n_fd, seed=30_000)
    fa, fb, fg = (detector_features(det, x) for x in (real_a, real_b, gen))
    res["frechet"] = {"generated_vs_real": frechet_distance(fg, fa), "real_vs_real": frechet_distance(fb, fa),
                      "n": n_fd, "seconds": round(time.time() - t0, 1)}
    print("frechet", res["frechet"], flush=True)

    # 4. Throughput at batch 64, default steps (median over batches, after a warm-up batch).
    prompts = ShapesWorld().sample(64, seed=3).captions
    generate(model, prompts, list(range(64)), config=cfg, progress=False)
    times = []
    for r in range(3):
        t0 = time.time()
        generate(model, prompts, list(range(64 * r, 64 * (r + 1))), config=cfg, progress=False)
        times.append(time.time() - t0)
    res["throughput"] = {"batch": 64, "steps": cfg.steps, "median_batch_seconds": statistics.median(times),
                         "images_per_second": 64 / statistics.median(times)}
    print("throughput", res["throughput"], flush=True)

    # 5. Shipped weights: size and the recipe that made them.
    files = [p for p in TOY_ROOT.rglob("*") if p.is_file()]
    res["weights"] = {"total_mb": round(sum(p.stat().st_size for p in files) / 1e6, 2)}
    recipe = TOY_ROOT / "recipe.json"
    if recipe.exists():
        res["weights"]["recipe"] = json.loads(recipe.read_text())

    g = res["prompt_fidelity"]
    checks = {
        "detector_every_head_ge_98": all(res["detector_accuracy"][h] >= BARS["detector"] for h in HEADS),
        "shape_ge_90": min(g["word"]["shape"], g["synonym"]["shape"], g["style"]["shape"]) >= BARS["shape"],
        "colour_ge_90": min(g["word"]["colour"], g["synonym"]["colour"], g["style"]["colour"]) >= BARS["colour"],
        "style_ge_85": g["style"]["style"] >= BARS["style"],
        "synonyms_meet_bars": g["synonym"]["shape"] >= BARS["shape"] and g["synonym"]["colour"] >= BARS["colour"],
        "weights_le_40mb": res["weights"]["total_mb"] <= 40,
    }
    res["acceptance"] = checks
    out = RESULTS / ("toyworld_quick.json" if args.quick else "toyworld.json")
    atomic_write_json(out, res)
    da = res["detector_accuracy"]
    print("\n| figure | measured | bar |\n|---|---|---|")
    print(f"| detector accuracy, {n_det} fresh images (shape / colour / style / background) | "
          f"{da['shape']:.1%} / {da['colour']:.1%} / {da['style']:.1%} / {da['background']:.1%} | >= 98 % |")
    for grp, label in (("word", "'a {colour} {shape}'"), ("synonym", "'a {colour} {synonym}'"),
                       ("style", "'a {colour} {style} {shape}'")):
        extra = f" / style {g[grp]['style']:.1%}" if "style" in g[grp] else ""
        print(f"| fidelity {label}, {g[grp]['n_images']} images: shape / colour{' / style' if extra else ''} | "
              f"{g[grp]['shape']:.1%} / {g[grp]['colour']:.1%}{extra} | 90 / 90{' / 85' if extra else ''} % |")
    fr = res["frechet"]
    print(f"| feature Fréchet distance, {fr['n']} generated vs real (real vs real floor) | "
          f"{fr['generated_vs_real']:.2f} ({fr['real_vs_real']:.2f}) | - |")
    ips = res["throughput"]["images_per_second"]
    print(f"| throughput, batch 64, {cfg.steps} DDIM steps | {ips:.1f} images/s | - |")
    print(f"| shipped weights | {res['weights']['total_mb']} MB | <= 40 MB |")
    print(f"\nwrote {out}; acceptance: {checks}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

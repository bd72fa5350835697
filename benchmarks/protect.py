"""Benchmark of image protection against inpainting: Attack as Defense on the toy inpainter.

Zhang et al., "Attack as Defense", arXiv 2410.14966, paper defaults (eps 0.025, 20 Adam steps, lr 0.1, betas
(0.5, 0.5), weights 1/1/2). Over held-out toy scenes (seed 10000; the inpainter trained on seeds 0 and 1000):

- the inpainter's own quality: PSNR of fills (object removal vs the scene without the object, boxes elsewhere);
- success rate (>= 90 % of hole pixels within 0.2 of the target colour) with the protected mask M, the expanded
  mask M_e and partial masks; benign-edit PSNR inside boxes outside M_e; PSNR(protected, original);
- the same after storage/transmission: float (no rounding), uint8, JPEG 95/75/50, 0.5x resize and back;
- with and without the robustness option (expectation over transformations, ``EOTConfig()``);
- time to protect one 256x256 image (1 thread), with and without the robustness option.

Usage: ``python benchmarks/protect.py [--n 100] [--threads 1]`` -> benchmarks/results/protect.json,
benchmarks/results/protect_panel.png and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from diffshield.core.io import atomic_write_json
from diffshield.protect.attack_as_defense import AttackAsDefenseConfig, protect
from diffshield.protect.inpainters import count_parameters, load_inpainter
from diffshield.protect.metrics import evaluate_protection, panel
from diffshield.protect.robust import EOTConfig, jpeg_roundtrip, resize_roundtrip, uint8_roundtrip
from diffshield.protect.scenes import benign_masks, make_scenes, protected_masks
from diffshield.protect.train_inpainter import fill_psnr

ROOT = Path(__file__).resolve().parent
KEYS = ("success_rate", "success_rate_expanded", "success_rate_partial_dilate4", "success_rate_partial_half",
        "success_rate_partial_box", "distance_to_target_M", "distance_to_target_M_unprotected", "psnr_benign",
        "psnr_protected", "linf")


def run_protect(f, x, m, cfg, chunk):
    outs, t0 = [], time.time()
    losses = []
    for i in range(0, len(x), chunk):
        r = protect(f, x[i:i + chunk], m[i:i + chunk], cfg)
        outs.append(r.protected)
        losses.append((r.losses[0], r.losses[-1]))
        print(f"  protected {min(i + chunk, len(x))}/{len(x)} ({time.time() - t0:.0f} s)", flush=True)
    return torch.cat(outs), time.time() - t0, losses


def conditions(xf):
    u8 = uint8_roundtrip(xf)
    return {"float": xf, "uint8": u8, "jpeg95": jpeg_roundtrip(u8, 95), "jpeg75": jpeg_roundtrip(u8, 75),
            "jpeg50": jpeg_roundtrip(u8, 50), "resize0.5": uint8_roundtrip(resize_roundtrip(u8, 0.5))}


def time_256(f, eot: EOTConfig | None, threads: int) -> float:
    torch.set_num_threads(threads)
    s = make_scenes(1, 256, seed=77)
    t0 = time.time()
    protect(f, s.images, protected_masks(s.object_masks, 4), AttackAsDefenseConfig(eot=eot))
    return time.time() - t0


def sensitivity(f, x, m) -> dict:
    """First-order reach of an L-inf attack: ||d mean_hole(f(x, M)) / dx||_1 per colour channel, i.e. how far eps = 1
    of perturbation can move the mean fill colour (times eps for a budget eps). Median and max over images."""
    x = x.clone().requires_grad_(True)
    y = f(x, m)
    out = {}
    for c, name in enumerate("RGB"):
        g = torch.autograd.grad(((y[:, c:c + 1] * m).sum((1, 2, 3)) / m.sum((1, 2, 3))).sum(), x, retain_graph=True)[0]
        n = g.abs().sum((1, 2, 3))
        out[f"reach_per_unit_eps_{name}"] = {"median": float(n.median()), "max": float(n.max())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="scenes (default: 100)")
    p.add_argument("--size", type=int, default=64, help="scene side in px (default: 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--chunk", type=int, default=25, help="images per protect batch (default: 25)")
    p.add_argument("--inpainter", default="toy", help="inpainter (default: toy)")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.05, 0.1, 0.2],
                   help="extra eps values for the sweep (default: 0.05 0.1 0.2)")
    p.add_argument("--sweep-n", type=int, default=32, help="scenes in the eps sweep (default: 32)")
    p.add_argument("--no-eot", action="store_true", help="skip the robustness-option run")
    p.add_argument("--out", default=str(ROOT / "results" / "protect.json"), help="result JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.time()
    f = load_inpainter(args.inpainter)
    s = make_scenes(args.n, args.size, seed=10_000)
    m = protected_masks(s.object_masks)
    print(f"{args.n} scenes of {args.size} px, mean protected area {float(m.mean()):.1%}")
    quality = {
        "object_removal_psnr_db": fill_psnr(f, s.images, m, s.without_object),
        "box_outside_object_psnr_db": fill_psnr(f, s.images, benign_masks(m, seed=1)),
    }
    res: dict = {
        "benchmark": "protect", "n_scenes": args.n, "size": args.size, "scene_seed": 10_000,
        "inpainter": args.inpainter,
        "inpainter_parameters": count_parameters(f), "inpainter_quality": quality,
        "config": {"eps": 0.025, "steps": 20, "lr": 0.1, "betas": [0.5, 0.5], "weights": [1, 1, 2],
                   "success": ">= 90 % of hole pixels within 0.2 (max over RGB) of the target colour"},
        "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "runs": {},
    }
    variants = {"paper": None} if args.no_eot else {"paper": None, "eot": EOTConfig()}
    for name, eot in variants.items():
        print(f"[{name}] protecting ...")
        cfg = AttackAsDefenseConfig(eot=eot, quantize=False)
        xf, secs, losses = run_protect(f, s.images, m, cfg, args.chunk)
        run = {"seconds_total": round(secs, 1), "seconds_per_image": round(secs / args.n, 3),
               "loss_first_last": losses, "eot": None if eot is None else vars(eot), "conditions": {}}
        for cname, xc in conditions(xf).items():
            ev = evaluate_protection(f, s.images, xc, m, seed=3)
            imgs = ev.pop("_images")
            ev.pop("per_image")
            run["conditions"][cname] = {k: ev[k] for k in ev if not k.startswith("_")}
            if name == "paper" and cname == "uint8":
                panel(imgs, slice(0, 6), upscale=2).save(ROOT / "results" / "protect_panel.png")
            print(f"  {cname:<9} " + "  ".join(
                f"{k.replace('success_rate', 'sr')}={ev[k]:.3f}" for k in KEYS if ev.get(k) is not None))
        res["runs"][name] = run
    sweep_n = min(args.n, args.sweep_n)
    res["eps_sweep"] = {"n_scenes": sweep_n, "note": "paper method, uint8 output, first scenes only", "runs": {}}
    for eps in args.sweep:
        r = protect(f, s.images[:sweep_n], m[:sweep_n], AttackAsDefenseConfig(eps=eps, init=min(0.01, eps)))
        ev = evaluate_protection(f, s.images[:sweep_n], r.protected, m[:sweep_n], seed=3, partial=False)
        res["eps_sweep"]["runs"][str(eps)] = {
            "success_rate": ev["success_rate"], "success_rate_expanded": ev["success_rate_expanded"],
            "psnr_protected": ev["psnr_protected"], "psnr_benign": ev["psnr_benign"],
            "mean_target_fraction_M": ev["target_fraction_M"],
            "distance_to_target_M": ev["distance_to_target_M"],
            "distance_to_target_M_unprotected": ev["distance_to_target_M_unprotected"],
            "loss_first_last": [r.losses[0], r.losses[-1]]}
        print(f"  eps {eps}: success M {ev['success_rate']:.2f}, mean hole fraction at target "
              f"{ev['target_fraction_M']:.3f}, distance to target {ev['distance_to_target_M']:.3f} "
              f"(unprotected {ev['distance_to_target_M_unprotected']:.3f})", flush=True)
    res["sensitivity"] = sensitivity(f, s.images[:sweep_n], m[:sweep_n])
    print(f"  sensitivity: {res['sensitivity']}")
    res["unprotected"] = {k: res["runs"]["paper"]["conditions"]["uint8"][k + "_unprotected"]
                          for k in ("success_rate", "success_rate_expanded")}
    print("timing one 256x256 image ...")
    res["time_256"] = {"paper_1thread_s": round(time_256(f, None, 1), 2)}
    if not args.no_eot:
        res["time_256"]["eot_1thread_s"] = round(time_256(f, EOTConfig(), 1), 2)
    res["load_average_at_end"] = list(os.getloadavg())
    torch.set_num_threads(args.threads)
    res["total_minutes"] = round((time.time() - t_all) / 60, 2)
    res["command"] = "python benchmarks/protect.py " + " ".join(sys.argv[1:])
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}\n")
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    """The table of docs/protect.md."""
    pct = lambda v: "-" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    db = lambda v: "-" if v is None else f"{v:.1f} dB"  # noqa: E731
    dist = lambda ev, k: f"{ev[f'distance_to_target_{k}_unprotected']:.2f} -> {ev[f'distance_to_target_{k}']:.2f}"  # noqa: E731
    lines = ["| option | stored as | success M | success M_e | partial: dilate 4 / half / box | "
             "fill distance to target, M (unprot. -> prot.) | same, M_e | benign PSNR | PSNR(prot, orig) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, run in res["runs"].items():
        for c, ev in run["conditions"].items():
            lines.append(f"| {name} | {c} | {pct(ev['success_rate'])} | {pct(ev['success_rate_expanded'])} | "
                         f"{pct(ev['success_rate_partial_dilate4'])} / {pct(ev['success_rate_partial_half'])} / "
                         f"{pct(ev['success_rate_partial_box'])} | {dist(ev, 'M')} | {dist(ev, 'M_e')} | "
                         f"{db(ev['psnr_benign'])} | "
                         f"{db(ev['psnr_protected'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""TERD reversion on the CPU: does r move, and towards the trigger? (Mo et al., ICML 2024.)

For each TERD setting and each model (the shipped backdoored example ``box_corner`` and the clean ``toy:ddpm``), runs
``reverse_trigger`` on one thread and records how far r moved from its random start r0 (L2, relative, cosine),
its cosine to the true trigger against r0's, the model statistics, the verdict against the shipped thresholds, and
the wall time; optionally the strict ASR of DDPM-1000 samples from eps + r_hat (``--asr-n``). One JSON per run is
cached in runs/terd_cpu/; the summary goes to benchmarks/results/terd_cpu.json.

    python benchmarks/terd_cpu.py                                    # the presets fast and default
    python benchmarks/terd_cpu.py --settings fast s1=400,s2=0,lr=2   # named presets or key=value settings
    python benchmarks/terd_cpu.py --settings s1=200,s2=0,lam=0.003 --asr-n 8   # a larger L1 weight lambda
    python benchmarks/terd_cpu.py --probe    # stage 1's loss landscape, its descent direction at r0, its local basin
    python benchmarks/terd_cpu.py --input-detection --settings s1=800,s2=0,lam=0.003 --models box_corner
    python benchmarks/terd_cpu.py --probe --probe-model deeper=runs/terd_cpu/box_corner_deeper  # (see --help)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "terd_cpu"
OUT = ROOT / "benchmarks" / "results" / "terd_cpu.json"
#: model name -> (trigger, target) it was implanted with; clean models are scored against the box trigger
BACKDOORS = {"box_corner": ("box", "corner"), "box_corner_deeper": ("box", "corner"),
             "checker_corner_p20": ("checker", "corner"), "checker_cornergrey_p20": ("checker", "corner_grey")}
KEYS = {"s1": "stage1_iters", "s2": "stage2_iters", "lr": "lr", "bs": "batch_size", "seed": "seed", "lam": "lam"}


def parse_setting(text: str) -> tuple[str, dict]:
    """``fast`` / ``default`` / ``paper`` or ``s1=400,s2=0,lr=2`` (keys s1, s2, lr, bs, seed, lam) -> name, kwargs."""
    from diffshield.backdoor.terd import PRESETS

    if text in PRESETS:
        return text, dict(PRESETS[text])
    kw = {}
    for part in text.split(","):
        k, v = part.split("=")
        kw[KEYS[k]] = float(v) if k in ("lr", "lam") else int(v)
    return text, kw


def run_one(model_name: str, spec, setting: str, kw: dict, asr_n: int) -> dict:
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.metrics import backdoor_metrics
    from diffshield.backdoor.sampling import SampleConfig, sample
    from diffshield.backdoor.terd import (
        Calibration,
        TERDConfig,
        default_calibration_path,
        model_verdict,
        reverse_trigger,
    )
    from diffshield.backdoor.triggers import get_target, get_trigger

    f = CACHE / f"{model_name}__{setting.replace('=', '').replace(',', '_')}.json"
    if f.exists():
        d = json.loads(f.read_text())
        if "r_mean_in_mask" in d and (asr_n <= d.get("asr_n", 0) or model_name not in BACKDOORS):
            return d
    model = load_ddpm(spec)
    cfg = TERDConfig(**{"num_threads": 1, **kw})
    res = reverse_trigger(model, cfg, progress=False)
    trig_name, target_name = BACKDOORS.get(model_name, ("box", "corner"))
    box = get_trigger(trig_name)
    tau = box.flatten().double()
    mask = trigger_region(trig_name, box)

    def cos(a: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten().double(), tau, dim=0))

    th = Calibration.load(default_calibration_path()).thresholds.get("fast")
    d = {"model": model_name, "setting": setting, "config": res.config, "seconds": round(res.seconds, 1),
         "moved_l2": res.moved_l2, "moved_rel": res.moved_rel, "cos_r0": res.cos_r0,
         "cos_true_trigger": cos(res.r), "cos_true_trigger_r0": cos(res.r0), "r_norm": float(res.r.norm()),
         "r0_norm": float(res.r0.norm()), "mean_kl": res.mean_kl, "var_kl": res.var_kl,
         "verdict_fast_thresholds": model_verdict(res, th), "history": res.history,
         # the trigger's frame is grey (0) on -1: a reversed trigger shows it as a higher mean inside the mask
         "r_mean_in_mask": float(res.r[mask].mean()), "r_mean_outside": float(res.r[~mask].mean()),
         "true_trigger_mean_in_mask": float(box[mask].mean()), "true_trigger_mean_outside": float(box[~mask].mean()),
         "trigger": trig_name, "cos_in_region": float(torch.nn.functional.cosine_similarity(
             res.r[mask].double(), box[mask].double(), dim=0))}
    if asr_n and model_name in BACKDOORS:
        target = (get_target(target_name) + 1) / 2

        def strict_asr(r: torch.Tensor) -> tuple[float, float]:
            imgs = sample(model, list(range(asr_n)), trigger=r, config=SampleConfig("ddpm", 1000)).images
            m = backdoor_metrics(imgs, target)
            return m["asr"], m["asr_strict"]

        d["asr_n"] = asr_n
        d["asr_r_hat"], d["asr_strict_r_hat"] = strict_asr(res.r)
        # controls: r_hat's mean without its structure, and the random start
        d["asr_strict_mean_shift"] = strict_asr(torch.full_like(res.r, float(res.r.mean())))[1]
        d["asr_strict_r0"] = strict_asr(res.r0)[1]
    CACHE.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"r": res.r.contiguous(), "r0": res.r0.contiguous()}, str(f.with_suffix(".safetensors")))
    f.write_text(json.dumps(d, indent=2))
    return d


def trigger_region(name: str, g: torch.Tensor) -> torch.Tensor:
    """The pixels a trigger sets: M = [g > -1] for the -1-background triggers, the checkerboard for ``checker``."""
    from diffshield.backdoor.triggers import trigger_mask

    return (g != 0) if name in ("checker", "checker_tl") else trigger_mask(g).bool()


def input_detection(model_name: str, setting: str, n: int = 1000) -> dict:
    """TERD input detection (Mo et al., ICML 2024) with the r_hat of a cached run of ``setting`` on ``model_name``:
    poisoned inputs eps + g (g the model's trigger) against clean eps, n of each (seeds 0.. and 10^6..).

    Score s(x) = <x, r> - ||r||^2 / 2, the log-likelihood ratio of N(r, I) against N(0, I) (gamma = 1): TERD flags
    s > 0. Reported: TPR and FPR of that rule, and TPR at 5 % FPR (the threshold at the clean scores' 95th
    percentile), for r_hat and for controls that know nothing of the trigger: r0 (the reversion's start), a
    Gaussian vector of r_hat's norm, and a constant at r_hat's mean. A control near 5 % TPR at 5 % FPR says the
    test is not trivial; a control near 100 % says the two distributions differ by something any vector sees."""
    from safetensors.torch import load_file

    from diffshield.backdoor.triggers import get_trigger

    f = CACHE / f"{model_name}__{setting.replace('=', '').replace(',', '_')}.safetensors"
    saved = load_file(str(f))
    r_hat, r0 = saved["r"], saved["r0"]
    g = get_trigger(BACKDOORS.get(model_name, ("box", "corner"))[0])
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn((n, *g.shape), generator=gen)
    poisoned = torch.randn((n, *g.shape), generator=gen) + g
    gauss = torch.randn(g.shape, generator=gen)
    vectors = {"r_hat": r_hat, "control_r0": r0, "control_gaussian": gauss * r_hat.norm() / gauss.norm(),
               "control_constant_mean": torch.full_like(r_hat, float(r_hat.mean()))}
    out = {"model": model_name, "setting": setting, "trigger": BACKDOORS.get(model_name, ("box",))[0], "n": n}
    for name, r in vectors.items():
        def score(x: torch.Tensor, r: torch.Tensor = r) -> torch.Tensor:
            return x.flatten(1) @ r.flatten() - 0.5 * r.pow(2).sum()

        sc, sp = score(clean), score(poisoned)
        thr = torch.quantile(sc, 0.95)
        out[name] = {"tpr_terd_rule": float((sp > 0).float().mean()), "fpr_terd_rule": float((sc > 0).float().mean()),
                     "tpr_at_5pct_fpr": float((sp > thr).float().mean())}
    return out


def loss_probe(specs: dict, batches: int = 6, batch_size: int = 16, basin_iters: int = 60,
               trigger: str = "box") -> dict:
    """Where stage 1 of TERD (Mo et al., ICML 2024) can go on each model, without running a reversion.

    - ``stage1_loss_at``: the reversed loss L(r) (t in [990, 999], s = 1) at fixed r, averaged over ``batches``
      batches with the same draws for every r: r0 (the seed-0 start), the true box trigger g, 0, g/2, a constant -0.5;
    - ``line_alpha_g`` / ``line_r0_to_g`` / ``line_constant``: L along r = a g, r = (1 - b) r0 + b g and r = c;
    - ``grad_at_r0``: cosine of the descent direction -grad L(r0) with g - r0, over all pixels, inside the trigger's
      mask and outside it (does one step from r0 head for the trigger?);
    - ``local_basin``: stage 1's update (SGD lr 0.5, lambda 5e-5) for ``basin_iters`` iterations from g + sigma N:
      does the reversion stay at the trigger when it starts near it? (cosine to g before and after).

    ``trigger`` names g (default ``box``; ``checker`` for the additive trigger without a -1 background)."""
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import reversed_loss
    from diffshield.backdoor.triggers import get_trigger, trigger_mask

    tau = get_trigger(trigger)
    mask = (tau != 0) if trigger in ("checker", "checker_tl") else trigger_mask(tau)
    mask = mask.expand_as(tau).bool()
    r0 = -torch.rand((1, *tau.shape), generator=torch.Generator().manual_seed(0))[0]  # the seed-0 start
    points = {"r0": r0, "true_trigger": tau, "zero": torch.zeros_like(tau), "half_trigger": 0.5 * tau,
              "constant_-0.5": torch.full_like(tau, -0.5)}

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))

    out: dict = {}
    for name, spec in specs.items():
        model = load_ddpm(spec)
        unet, sched = model.unet, model.scheduler
        unet.eval().requires_grad_(False)

        def loss_at(r: torch.Tensor, grad: bool = False, unet=unet, sched=sched):
            gen = torch.Generator().manual_seed(1)
            r = r.clone().requires_grad_(grad)
            total = 0.0
            for _ in range(batches):
                x0 = torch.randn((batch_size, *tau.shape), generator=gen)
                t = torch.randint(990, 1000, (batch_size,), generator=gen)
                with torch.set_grad_enabled(grad):
                    total = total + reversed_loss(unet, sched, x0, r[None], t, 1.0, gen) / batches
            if grad:
                total.backward()
                return float(total.detach()), r.grad
            return float(total)

        row = {"stage1_loss_at": {k: loss_at(v) for k, v in points.items()},
               "line_alpha_g": {a: loss_at(a * tau) for a in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)},
               "line_r0_to_g": {b: loss_at((1 - b) * r0 + b * tau) for b in (0.0, 0.25, 0.5, 0.75, 1.0)},
               "line_constant": {c: loss_at(torch.full_like(tau, c)) for c in (-0.25, -0.5, -0.75, -1.0)}}
        _, g = loss_at(r0, grad=True)
        d = tau - r0
        row["grad_at_r0"] = {"cos_all": cos(-g, d), "cos_in_mask": cos(-g[mask], d[mask]),
                             "cos_outside_mask": cos(-g[~mask], d[~mask])}
        basin = {}
        gen = torch.Generator().manual_seed(3)
        for sigma in (0.2, 0.5):
            r = (tau + sigma * torch.randn(tau.shape, generator=gen))[None].requires_grad_(True)
            before = cos(r.detach(), tau)
            opt = torch.optim.SGD([r], lr=0.5)
            g2 = torch.Generator().manual_seed(11)
            for _ in range(basin_iters):
                x0 = torch.randn((batch_size, *tau.shape), generator=g2)
                t = torch.randint(990, 1000, (batch_size,), generator=g2)
                loss = reversed_loss(unet, sched, x0, r, t, 1.0, g2) - 5e-5 * r.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            basin[sigma] = {"cos_to_g_before": before, "cos_to_g_after": cos(r.detach(), tau)}
        row["local_basin"] = basin
        out[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    return {"probe": out, "batches": batches, "batch_size": batch_size, "basin_iters": basin_iters,
            "trigger": trigger, "r0_seed": 0}


def main() -> None:
    from diffshield.toyworld.names import TOY_ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["fast", "default"])
    p.add_argument("--models", nargs="+", default=["box_corner", "toy_ddpm"])
    p.add_argument("--asr-n", type=int, default=0, help="DDPM-1000 samples from eps + r_hat per backdoored model")
    p.add_argument("--probe", action="store_true", help="only the landscape probe (see loss_probe)")
    p.add_argument("--input-detection", action="store_true",
                   help="input detection with the cached r_hat of each --settings x --models run, with controls")
    p.add_argument("--probe-trigger", default="box", help="the trigger g of --probe (default box; or checker)")
    p.add_argument("--probe-model", action="append", default=[], metavar="NAME=PATH",
                   help="probe this model too (e.g. a longer implant), repeatable")
    args = p.parse_args()
    torch.set_num_threads(1)
    specs = {"box_corner": TOY_ROOT / "ddpm" / "examples" / "box_corner", "toy_ddpm": "toy:ddpm",
             # made by: diffshield backdoor implant --model <box_corner> --epochs 24 --seed 5 --out <this>
             "box_corner_deeper": CACHE / "box_corner_deeper",
             # made by: diffshield backdoor implant --model toy:ddpm --trigger checker --target corner
             #          --poison-rate 0.2 --out <this>
             "checker_corner_p20": CACHE / "checker_corner_p20",
             # the same with a grey-background target (does the cpu verdict follow the target's darkness?); made by:
             # diffshield backdoor implant --model toy:ddpm --trigger checker --target corner_grey
             #          --poison-rate 0.2 --out <this>
             "checker_cornergrey_p20": CACHE / "checker_cornergrey_p20",
             # a clean control with the implant's lr, pool and batch, a third of its length; made by:
             # diffshield backdoor train-ddpm --init toy:ddpm --steps 1536 --lr 2e-4 --warmup 20 --pool-size 2048
             #          --ema-decay 0 --seed 4 --out <this>
             "clean_ft_1536": CACHE / "clean_ft_1536"}
    from diffshield.core.io import atomic_write_json

    if args.probe:
        old = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
        extra = dict(item.split("=", 1) for item in args.probe_model)
        old.pop("loss_probe", None)
        key = "landscape" if args.probe_trigger == "box" else f"landscape_{args.probe_trigger}"
        probe = loss_probe({**{m: specs[m] for m in args.models}, **extra}, trigger=args.probe_trigger)
        atomic_write_json(OUT, {**old, key: probe})
        return
    if args.input_detection:
        old = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
        rows = [input_detection(m, parse_setting(s)[0]) for s in args.settings for m in args.models]
        for r in rows:
            print(r["model"], r["setting"], {k: v for k, v in r.items() if isinstance(v, dict)}, flush=True)
        keep = [r for r in old.get("input_detection", []) if (r["model"], r["setting"]) not in
                {(x["model"], x["setting"]) for x in rows}]
        atomic_write_json(OUT, {**old, "input_detection": keep + rows})
        return
    rows = []
    for setting in args.settings:
        name, kw = parse_setting(setting)
        for m in args.models:
            t0 = time.time()
            d = run_one(m, specs[m], name, kw, args.asr_n)
            rows.append(d)
            print(f"{name:24s} {m:11s} moved {d['moved_rel']:.3f} x ||r0|| (cos r0 {d['cos_r0']:.4f})  cos to the "
                  f"box trigger {d['cos_true_trigger_r0']:.3f} -> {d['cos_true_trigger']:.3f}  ||r|| "
                  f"{d['r_norm']:.1f}  mean KL {d['mean_kl']:.4f} var KL {d['var_kl']:.5f}  "
                  f"{d['verdict_fast_thresholds']}  {d['seconds']:.0f} s"
                  + f"  r in/out of the frame {d['r_mean_in_mask']:.2f}/{d['r_mean_outside']:.2f}"
                  + (f"  strict ASR from eps + r_hat {d['asr_strict_r_hat']:.2f}, + its mean "
                     f"{d['asr_strict_mean_shift']:.2f}, + r0 {d['asr_strict_r0']:.2f}" if "asr_strict_r_hat" in d
                     else "")
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    keep = [r for r in old.get("runs", []) if (r["model"], r["setting"]) not in {(d["model"], d["setting"])
                                                                                 for d in rows}]
    atomic_write_json(OUT, {**old, "runs": keep + [{k: v for k, v in d.items() if k != "history"} for d in rows],
                            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                        "threads": 1, "note": "2-core machine shared with other jobs"}})


if __name__ == "__main__":
    main()

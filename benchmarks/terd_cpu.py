"""TERD reversion on the CPU: does r move, and towards the trigger? (Mo et al., ICML 2024.)

For each TERD setting and each model (the shipped backdoored example ``box_corner`` and the clean ``toy:ddpm``), runs
``reverse_trigger`` on one thread and records how far r moved from its random start r0 (L2, relative, cosine),
its cosine to the true trigger against r0's, the model statistics, the verdict against the shipped thresholds, and
the wall time; optionally the strict ASR of DDPM-1000 samples from eps + r_hat (``--asr-n``). One JSON per run is
cached in runs/terd_cpu/; the summary goes to benchmarks/results/terd_cpu.json.

    python benchmarks/terd_cpu.py                                    # the presets fast and default
    python benchmarks/terd_cpu.py --settings fast s1=400,s2=0,lr=2   # named presets or key=value settings
    python benchmarks/terd_cpu.py --probe    # stage 1's reversed loss at r0, the true trigger, 0, ... (no reversion)
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
KEYS = {"s1": "stage1_iters", "s2": "stage2_iters", "lr": "lr", "bs": "batch_size", "seed": "seed"}


def parse_setting(text: str) -> tuple[str, dict]:
    """``fast`` / ``default`` / ``paper`` or ``s1=400,s2=0,lr=2`` (keys s1, s2, lr, bs, seed) -> (name, kwargs)."""
    from diffshield.backdoor.terd import PRESETS

    if text in PRESETS:
        return text, dict(PRESETS[text])
    kw = {}
    for part in text.split(","):
        k, v = part.split("=")
        kw[KEYS[k]] = float(v) if k == "lr" else int(v)
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
        if asr_n <= d.get("asr_n", 0) or d["model"] == "toy_ddpm":
            return d
    model = load_ddpm(spec)
    cfg = TERDConfig(**{"num_threads": 1, **kw})
    res = reverse_trigger(model, cfg, progress=False)
    tau = get_trigger("box").flatten().double()

    def cos(a: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten().double(), tau, dim=0))

    th = Calibration.load(default_calibration_path()).thresholds.get("fast")
    d = {"model": model_name, "setting": setting, "config": res.config, "seconds": round(res.seconds, 1),
         "moved_l2": res.moved_l2, "moved_rel": res.moved_rel, "cos_r0": res.cos_r0,
         "cos_true_trigger": cos(res.r), "cos_true_trigger_r0": cos(res.r0), "r_norm": float(res.r.norm()),
         "r0_norm": float(res.r0.norm()), "mean_kl": res.mean_kl, "var_kl": res.var_kl,
         "verdict_fast_thresholds": model_verdict(res, th), "history": res.history}
    if asr_n and model_name != "toy_ddpm":
        imgs = sample(model, list(range(asr_n)), trigger=res.r, config=SampleConfig("ddpm", 1000)).images
        m = backdoor_metrics(imgs, (get_target("corner") + 1) / 2)
        d.update(asr_n=asr_n, asr_r_hat=m["asr"], asr_strict_r_hat=m["asr_strict"])
    CACHE.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(d, indent=2))
    return d


def loss_probe(specs: dict, batches: int = 6, batch_size: int = 16) -> dict:
    """Stage 1's reversed loss L(r) (t in [990, 999], s = 1; Mo et al., ICML 2024) at fixed r, averaged over
    ``batches`` batches with the same draws for every r: is the true trigger a minimum the reversion can reach?"""
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import reversed_loss
    from diffshield.backdoor.triggers import get_trigger

    tau = get_trigger("box")
    r0 = -torch.rand((1, *tau.shape), generator=torch.Generator().manual_seed(0))[0]  # the seed-0 start
    points = {"r0": r0, "true_trigger": tau, "zero": torch.zeros_like(tau), "half_trigger": 0.5 * tau,
              "constant_-0.5": torch.full_like(tau, -0.5)}
    out = {}
    for name, spec in specs.items():
        model = load_ddpm(spec)
        row = {}
        for label, r in points.items():
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                losses = []
                for _ in range(batches):
                    x0 = torch.randn((batch_size, *tau.shape), generator=gen)
                    t = torch.randint(990, 1000, (batch_size,), generator=gen)
                    losses.append(float(reversed_loss(model.unet, model.scheduler, x0, r[None], t, 1.0, gen)))
            row[label] = sum(losses) / len(losses)
        out[name] = row
        print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)
    return {"stage1_loss_at": out, "batches": batches, "batch_size": batch_size}


def main() -> None:
    from diffshield.toyworld.names import TOY_ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["fast", "default"])
    p.add_argument("--models", nargs="+", default=["box_corner", "toy_ddpm"])
    p.add_argument("--asr-n", type=int, default=0, help="DDPM-1000 samples from eps + r_hat per backdoored model")
    p.add_argument("--probe", action="store_true", help="only the loss probe (see loss_probe)")
    args = p.parse_args()
    torch.set_num_threads(1)
    specs = {"box_corner": TOY_ROOT / "ddpm" / "examples" / "box_corner", "toy_ddpm": "toy:ddpm"}
    from diffshield.core.io import atomic_write_json

    if args.probe:
        old = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
        atomic_write_json(OUT, {**old, "loss_probe": loss_probe({m: specs[m] for m in args.models})})
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
                  + (f"  strict ASR(eps + r_hat) {d['asr_strict_r_hat']:.2f}" if "asr_strict_r_hat" in d else "")
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    keep = [r for r in old.get("runs", []) if (r["model"], r["setting"]) not in {(d["model"], d["setting"])
                                                                                 for d in rows}]
    atomic_write_json(OUT, {**old, "runs": keep + [{k: v for k, v in d.items() if k != "history"} for d in rows],
                            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                        "threads": 1, "note": "2-core machine shared with other jobs"}})


if __name__ == "__main__":
    main()

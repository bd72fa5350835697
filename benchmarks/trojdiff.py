"""TrojDiff on the toy world, and TERD's reversion of its gamma (Chen et al., CVPR 2023; Mo et al., ICML 2024).

1. Implant: ``toy:ddpm`` fine-tuned with TrojDiff (D2I, blend trigger ``stop``, gamma 0.6, target ``hat``) on the
   BadDiffusion toy recipe (72 epochs x 2048 images, 10 % poisoned), resumable, in runs/trojdiff/.
2. The backdoor: strict ASR of the trojan DDIM from x_T = gamma eps + mu, against three controls: the same model
   sampled clean (plain DDIM from eps), the same model from eps + mu with plain DDIM (the trigger without TrojDiff's
   process), and the clean ``toy:ddpm`` with the trojan process (the process alone, without a backdoor).
3. TERD with ``learn_gamma``: r and gamma reversed at the ``cpu`` preset's settings (and any ``--settings``), on the
   TrojDiff model and on the clean ``toy:ddpm``; per model the cosine of r_hat to mu (and r0's), the mean of
   gamma_hat, the KL statistics, and the strict ASR of the trojan process from (r_hat, gamma_hat).
4. Input detection: log N(x; r_hat, gamma_hat^2) > log N(x; 0, I) on 1000 trojan noises against 1000 clean ones,
   TPR at 5 % FPR, with controls that know nothing of the trigger: (0, gamma_hat), (a Gaussian r of r_hat's norm,
   gamma_hat) and (r_hat, 1).

    python benchmarks/trojdiff.py                  # everything (the implant is about 45 min on one CPU thread)
    python benchmarks/trojdiff.py --epochs 36      # a shorter implant, saved under its own name

Writes benchmarks/results/trojdiff.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "trojdiff"
OUT = ROOT / "benchmarks" / "results" / "trojdiff.json"


def strict_asr(images: torch.Tensor, target01: torch.Tensor) -> dict:
    from diffshield.backdoor.metrics import backdoor_metrics

    m = backdoor_metrics(images, target01)
    return {"asr_strict": m["asr_strict"], "asr": m["asr"], "mse": round(m["mse"], 4), "n": m["n"]}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def input_detection(mu: torch.Tensor, gamma: float, r_hat: torch.Tensor, g_hat: torch.Tensor, n: int = 1000) -> dict:
    """TPR at 5 % FPR of TERD's likelihood-ratio score for (r_hat, gamma_hat) and for controls."""
    from diffshield.backdoor.terd import input_score

    gen = torch.Generator().manual_seed(0)
    clean = torch.randn((n, *mu.shape), generator=gen)
    trojan = gamma * torch.randn((n, *mu.shape), generator=gen) + mu
    gauss = torch.randn(mu.shape, generator=gen)

    pairs = {"r_hat_gamma_hat": (r_hat, g_hat), "control_zero_r_gamma_hat": (torch.zeros_like(r_hat), g_hat),
             "control_gaussian_r_gamma_hat": (gauss * r_hat.norm() / gauss.norm(), g_hat),
             "control_r_hat_gamma_1": (r_hat, torch.ones_like(r_hat))}
    out = {"n": n}
    for name, (r, g) in pairs.items():
        sc, sp = input_score(clean, r, g), input_score(trojan, r, g)
        thr = torch.quantile(sc, 0.95)
        out[name] = {"tpr_at_5pct_fpr": float((sp > thr).float().mean()),
                     "tpr_terd_rule": float((sp > 0).float().mean()), "fpr_terd_rule": float((sc > 0).float().mean())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=72, help="implant epochs (default 72, the toy recipe)")
    ap.add_argument("--gamma", type=float, default=0.6)
    ap.add_argument("--trigger", default="stop")
    ap.add_argument("--target", default="hat")
    ap.add_argument("--asr-n", type=int, default=16, help="images per ASR figure (default 16)")
    ap.add_argument("--steps", type=int, default=100, help="DDIM steps of every sampler here (default 100)")
    ap.add_argument("--settings", nargs="+", default=["cpu"],
                    help="TERD settings: a preset name or key=value,... (TERDConfig fields; default: cpu)")
    ap.add_argument("--skip-clean-scan", action="store_true", help="do not reverse the clean toy:ddpm")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from diffshield.backdoor.baddiffusion import implant
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.sampling import SampleConfig, sample
    from diffshield.backdoor.terd import PRESETS, TERDConfig, reverse_trigger
    from diffshield.backdoor.triggers import get_target, get_trigger
    from diffshield.backdoor.trojdiff import TrojDiffConfig, trojan_sample

    cfg = TrojDiffConfig(trigger=args.trigger, target=args.target, gamma=args.gamma, epochs=args.epochs)
    name = f"{args.trigger}_{args.target}_g{args.gamma:g}" + ("" if args.epochs == 72 else f"_e{args.epochs}")
    folder = RUNS / name
    t0 = time.time()
    if not (folder / "diffshield.json").exists():
        implant("toy:ddpm", cfg, folder)
    implant_s = json.loads((folder / "diffshield.json").read_text())["train_seconds"]
    model, clean_model = load_ddpm(folder), load_ddpm("toy:ddpm")
    g, y01 = get_trigger(args.trigger), (get_target(args.target) + 1) / 2
    mu, gamma = cfg.mu(g), args.gamma
    seeds = list(range(args.asr_n))
    ddim = SampleConfig("ddim", args.steps, batch_size=args.asr_n)
    res = {"benchmark": "trojdiff", "model": str(folder.relative_to(ROOT)), "implant": {
        "command": f"python benchmarks/trojdiff.py --epochs {args.epochs}", "config": {
            k: getattr(cfg, k) for k in ("trigger", "target", "gamma", "poison_rate", "epochs", "pool_size", "lr")},
        "steps": cfg.steps, "train_seconds": implant_s}, "sampler": f"trojan DDIM (eta 0), {args.steps} steps",
        "platform": platform.platform(), "torch": torch.__version__}
    res["backdoor"] = {
        "trojan_process": strict_asr(trojan_sample(model, seeds, mu, gamma, args.steps), y01),
        "control_clean_ddim": strict_asr(sample(model, seeds, config=ddim).images, y01),
        "control_eps_plus_mu_plain_ddim": strict_asr(sample(model, seeds, trigger=mu, config=ddim).images, y01),
        "control_clean_model_trojan_process": strict_asr(trojan_sample(clean_model, seeds, mu, gamma, args.steps),
                                                         y01)}
    print("backdoor:", json.dumps(res["backdoor"]))
    from diffshield.core.io import atomic_write_json

    atomic_write_json(args.out, res)  # rewritten after every scan, so a stopped run keeps what it measured
    res["terd"] = {}
    for setting in args.settings:
        kw = dict(PRESETS[setting]) if setting in PRESETS else {
            k: (float(v) if "." in v or "e" in v else int(v)) for k, v in (p.split("=") for p in setting.split(","))}
        rows = {}
        for mname, m in (("trojdiff", model), ("clean_toy_ddpm", clean_model)):
            if mname == "clean_toy_ddpm" and args.skip_clean_scan:
                continue
            r = reverse_trigger(m, TERDConfig(**{**kw, "learn_gamma": True, "num_threads": 1}), progress=True)
            row = {"seconds": round(r.seconds, 1), "moved_rel": r.moved_rel, "cos_mu": cos(r.r, mu),
                   "cos_mu_r0": cos(r.r0, mu), "r_norm": float(r.r.norm()), "mu_norm": float(mu.norm()),
                   "gamma_hat_mean": float(r.gamma.mean()), "gamma_hat_std": float(r.gamma.std()),
                   "mean_kl": r.mean_kl, "var_kl": r.var_kl, "config": r.config}
            if mname == "trojdiff":
                row["asr_from_r_hat_gamma_hat"] = strict_asr(trojan_sample(m, seeds, r.r, r.gamma, args.steps), y01)
                row["asr_from_r0_gamma_1"] = strict_asr(trojan_sample(m, seeds, r.r0, 1.0, args.steps), y01)
                row["input_detection"] = input_detection(mu, gamma, r.r, r.gamma)
            rows[mname] = row
            print(setting, mname, json.dumps({k: v for k, v in row.items() if k != "config"}))
            res["terd"][setting] = rows
            atomic_write_json(args.out, res)
    res["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Implant-recipe sweep behind the backdoor zoo's recipe: learning rate x length on bd_box_corner_p05.

Each trial fine-tunes toy:ddpm with BadDiffusion (box -> corner, poison rate 0.05, trigger_only R, 2048 images,
batch 32, warm-up 20 + cosine) and evaluates it like the zoo: 32 triggered DDPM-1000 samples (ASR, strict ASR),
128 clean DDIM-50 samples (share recognised by the toy detector). One clean fine-tune (lr 1e-4, 256 steps) shows
what the learning rate alone does to clean quality. Models and reports are cached in runs/bdtrial/ (a trial whose
report exists is not rerun).

Run: ``.venv/bin/python benchmarks/probes/backdoor_lr_sweep.py [--only NAME ...]`` (about 5-25 CPU-min per trial, one
thread each). Writes benchmarks/results/backdoor_lr_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs" / "bdtrial"
OUT = ROOT / "benchmarks" / "results" / "backdoor_lr_sweep.json"
CLI = [sys.executable, "-m", "diffshield.cli.main"]
IMPLANT = ["--trigger", "box", "--target", "corner", "--poison-rate", "0.05", "--r-mode", "trigger_only",
           "--pool-size", "2048"]
EVAL = ["--trigger", "box", "--target", "corner", "--n", "32", "--n-clean", "128"]

#: name -> (kind, lr, epochs or steps); lr 5e-4 / 12 epochs is the previous zoo recipe (runs/backdoor_v2)
TRIALS: dict[str, tuple[str, float, int]] = {
    "bd_box_corner_p05_lr1e-4": ("implant", 1e-4, 12),
    "bd_box_corner_p05_lr2e-4": ("implant", 2e-4, 12),
    "bd_box_corner_p05_lr3e-4_ep24": ("implant", 3e-4, 24),
    "bd_box_corner_p05_lr2e-4_ep36": ("implant", 2e-4, 36),
    "bd_box_corner_p05_lr2e-4_ep72": ("implant", 2e-4, 72),
    "clean_lr1e-4_s1": ("clean", 1e-4, 256),
}


def run_trial(name: str, kind: str, lr: float, length: int) -> dict:
    model, report = RUNS / name, RUNS / f"eval_{name}.json"
    if not report.exists():
        if not (model / "model_index.json").exists():
            if kind == "implant":
                cmd = [*CLI, "backdoor", "implant", *IMPLANT, "--epochs", str(length), "--lr", str(lr),
                       "--out", str(model)]
            else:
                cmd = [*CLI, "backdoor", "train-ddpm", "--init", "toy:ddpm", "--steps", str(length), "--lr", str(lr),
                       "--warmup", "20", "--pool-size", "2048", "--ema-decay", "0", "--seed", "1",
                       "--checkpoint-every", "128", "--out", str(model)]
            subprocess.run(cmd, check=True, cwd=ROOT)
        subprocess.run([*CLI, "backdoor", "eval", "--model", str(model), *EVAL, "--json", str(report)],
                       check=True, cwd=ROOT)
    r = json.loads(report.read_text())
    steps = length * (2048 // 32) if kind == "implant" else length
    return {"name": name, "kind": kind, "lr": lr, "steps": steps, "asr": r["asr"], "asr_strict": r["asr_strict"],
            "mse": r["mse"], "clean_quality": r["clean_quality"], "model": str(model.relative_to(ROOT))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these trials")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    rows = [run_trial(n, *spec) for n, spec in TRIALS.items() if not args.only or n in args.only]
    base = json.loads((ROOT / "runs" / "backdoor" / "results" / "eval_clean_base.json").read_text())
    res = {"base_clean_quality": base["clean"]["recognised"], "rows": rows,
           "note": "bd_box_corner_p05 trials; previous recipe (lr 5e-4, 768 steps): strict ASR 37.5 %, clean "
                   "quality 78.1 % (runs/backdoor_v2)"}
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'trial':34}{'lr':>8}{'steps':>7}{'ASR':>8}{'strict':>8}{'clean':>8}")
    for r in rows:
        print(f"{r['name']:34}{r['lr']:>8.0e}{r['steps']:>7}{r['asr']:>8.1%}{r['asr_strict']:>8.1%}"
              f"{r['clean_quality']:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

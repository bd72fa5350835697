"""Speed of the closed-form erasers (UCE, RECE) on an SD-1.4-shaped model, against the per-matrix structure.

UCE (Gandikota et al., WACV 2024) and RECE (Gong et al., ECCV 2024) update every cross-attention K/V matrix as
W_new = W · G with one d x d matrix G shared by all 32 matrices (:mod:`diffshield.erase.closed_form`). The official
code solves one d x d system per matrix instead. This benchmark builds an SD-1.4-shaped UNet (860 M parameters) and
a CLIP ViT-L/14-shaped text encoder with random weights (the architecture sets the cost, not the values), then
times, as the median over ``--repeats`` runs after one warm-up run, excluding model building and text encoding and
including every weight write:

- ``uce``: :func:`diffshield.erase.uce.uce_erase` (shared G), and the same edit with one float64 solve per matrix;
- ``rece``: :func:`diffshield.erase.rece.rece_erase` with 5 epochs, and the same algorithm in the per-matrix
  structure (two passes over all matrices for Σ W'ᵀW' and Σ W'ᵀW0 per epoch, then one float64 solve per matrix).

Both versions start from the same weights; the max abs difference of their results is reported.
Run: ``.venv/bin/python benchmarks/erase_speed.py`` (about 1 minute on 2 idle CPU cores; ``--repeats 5``).
Writes ``benchmarks/results/erase_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from diffshield.core.io import atomic_write_json
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import encode_prompts
from diffshield.erase.closed_form import kv_layers, kv_weights
from diffshield.erase.rece import RECEConfig, rece_erase
from diffshield.erase.uce import UCEConfig, uce_erase, uce_rows

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"uce": 0.5, "rece": 1.5}  # seconds, 2 CPU cores
CONCEPTS = ["nudity"]
WORDS = ("nudity", "nude", "naked", "art", "a", "photo", "of", "person", "painting", "by")


def build_sd14_shaped(tmp: Path) -> T2IModel:
    """Random-weight UNet2DConditionModel + CLIPTextModel with SD 1.4's shapes; a small word-level tokenizer."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffshield.toyworld.tokenizer import build_tokenizer_files

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    tokenizer = CLIPTokenizer.from_pretrained(build_tokenizer_files(WORDS, tmp / "tokenizer", model_max_length=77))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return T2IModel(unet=unet, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=None)


# --- The per-matrix structure of the official code (one float64 solve per matrix) ---------------------------------


def per_matrix_uce(layers, pairs, kept, lamb: float, erase_scale: float, preserve_scale: float) -> None:
    """For each W: W_new = (λW + s_e Σ W Tᵀ K + s_p Σ W Pᵀ P)(λI + s_e Σ KᵀK + s_p Σ PᵀP)⁻¹, solved in float64."""
    pairs = [(k.double(), t.double()) for k, t in pairs]
    kept = [p.double() for p in kept]
    with torch.no_grad():
        for _, mod in layers:
            w = mod.weight.double()
            mat1 = lamb * w
            mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
            for k, t in pairs:
                mat1 = mat1 + erase_scale * (w @ t.T) @ k
                mat2 = mat2 + erase_scale * (k.T @ k)
            for p in kept:
                mat1 = mat1 + preserve_scale * (w @ p.T) @ p
                mat2 = mat2 + preserve_scale * (p.T @ p)
            mod.weight.data.copy_(torch.linalg.solve(mat2, mat1.T).T)  # mat2 is symmetric


def per_matrix_rece(model: T2IModel, layers, w0: dict, cfg: RECEConfig) -> None:
    """RECE as the official code structures it: per-matrix UCE, then per epoch two passes and per-matrix solves."""
    pairs0, kept0 = uce_rows(model, CONCEPTS, cfg.uce)
    c = encode_prompts(model, CONCEPTS).double()
    t = encode_prompts(model, [cfg.uce.guides[0]] * len(CONCEPTS)).double()
    kept = list(encode_prompts(model, cfg.round_preserve))
    per_matrix_uce(layers, pairs0, kept0, cfg.uce.lamb, cfg.uce.erase_scale, cfg.uce.preserve_scale)
    d = c.shape[-1]
    with torch.no_grad():
        for _ in range(cfg.epochs):
            gram = cfg.lamb_r * torch.eye(d, dtype=torch.float64)
            cross = torch.zeros(d, d, dtype=torch.float64)
            for name, mod in layers:
                gram += (mod.weight.T @ mod.weight).double()
                cross += (mod.weight.T @ w0[name]).double()
            adv = c @ torch.linalg.solve(gram, cross).T
            per_matrix_uce(layers, list(zip(adv, t)), kept, cfg.lamb2, cfg.erase_scale, cfg.preserve_scale)


# --- Timing --------------------------------------------------------------------------------------------------------


def restore(layers, w0: dict) -> None:
    with torch.no_grad():
        for name, mod in layers:
            mod.weight.data.copy_(w0[name])


def timed(fn, layers, w0: dict, repeats: int) -> tuple[list[float], dict]:
    """Run fn after restoring the weights, 1 warm-up + ``repeats`` times; wall seconds of each timed run."""
    times = []
    for i in range(repeats + 1):
        restore(layers, w0)
        start = time.perf_counter()
        reported = fn()
        elapsed = time.perf_counter() - start
        if i:
            times.append(reported if reported is not None else elapsed)
    return times, {name: mod.weight.detach().clone() for name, mod in layers}


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def machine() -> dict:
    try:
        found = subprocess.run(["pgrep", "-f", "train_all|toyworld train"], capture_output=True, text=True)
        busy = found.stdout.split()
    except OSError:
        busy = []
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "other_training_job_running": bool(busy), "processor": platform.processor() or platform.machine()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method after one warm-up (default 5)")
    ap.add_argument("--epochs", type=int, default=5, help="RECE epochs (default 5)")
    ap.add_argument("--out", type=Path, default=RESULTS / "erase_speed.json", help="result JSON path")
    args = ap.parse_args()
    info = machine()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = build_sd14_shaped(Path(tmp))
        build_seconds = time.perf_counter() - t0
    layers = kv_layers(model.unet)
    w0 = kv_weights(model)
    uce_cfg = UCEConfig()
    rece_cfg = RECEConfig(epochs=args.epochs, lamb_r=0.1, uce=uce_cfg)
    pairs, kept = uce_rows(model, CONCEPTS, uce_cfg)  # text encoding, cached for every run below
    encode_prompts(model, CONCEPTS + uce_cfg.guides + rece_cfg.round_preserve)
    n_params = sum(w.numel() for w in w0.values())
    print(f"built in {build_seconds:.1f} s: {len(layers)} K/V matrices, {n_params:,} parameters", flush=True)

    runs: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    wall: dict[str, list[float]] = {"uce": [], "rece": []}

    def shared_uce():
        t = time.perf_counter()
        r = uce_erase(model, CONCEPTS, uce_cfg)
        wall["uce"].append(time.perf_counter() - t)
        return r.seconds

    def shared_rece():
        t = time.perf_counter()
        r = rece_erase(model, CONCEPTS, rece_cfg)
        wall["rece"].append(time.perf_counter() - t)
        return r.seconds

    plan = [
        ("uce", shared_uce),
        ("uce_per_matrix", lambda: per_matrix_uce(layers, pairs, kept, uce_cfg.lamb, uce_cfg.erase_scale,
                                                  uce_cfg.preserve_scale)),
        ("rece", shared_rece),
        ("rece_per_matrix", lambda: per_matrix_rece(model, layers, w0, rece_cfg)),
    ]
    for name, fn in plan:
        runs[name], results[name] = timed(fn, layers, w0, args.repeats)
        print(f"{name}: median {statistics.median(runs[name]):.3f} s ({', '.join(f'{x:.3f}' for x in runs[name])})",
              flush=True)
    restore(layers, w0)

    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = []
    for method in ("uce", "rece"):
        base = f"{method}_per_matrix"
        diff = max_abs_diff(results[method], results[base])
        scale = max(float(w.abs().max()) for w in results[base].values())
        rows.append({
            "method": method, "shared_g_s": med[method], "shared_g_call_wall_s": statistics.median(wall[method][1:]),
            "per_matrix_s": med[base], "speedup": med[base] / med[method], "max_abs_diff": diff,
            "max_abs_weight": scale, "target_s": TARGETS[method], "meets_target": med[method] <= TARGETS[method],
        })
    out = {
        "machine": info,
        "model": {"unet": "SD-1.4-shaped UNet2DConditionModel, random weights", "text_encoder": "CLIP ViT-L/14-shaped",
                  "kv_matrices": len(layers), "kv_parameters": n_params,
                  "unet_parameters": sum(p.numel() for p in model.unet.parameters()), "build_seconds": build_seconds},
        "config": {"concepts": CONCEPTS, "uce": rece_cfg.to_dict()["uce"], "rece_epochs": args.epochs,
                   "rece_lamb_r": rece_cfg.lamb_r, "repeats": args.repeats, "warmup": 1,
                   "timed": "edit only: text encoding and model building excluded, weight writes included"},
        "runs_s": runs,
        "summary": rows,
    }
    atomic_write_json(args.out, out)

    print(f"\nSD-1.4-shaped, {len(layers)} K/V matrices, {info['threads']} threads, load {info['load_average']}"
          f"{' (another training job was running)' if info['other_training_job_running'] else ''}\n")
    print("| method | shared G (s) | per-matrix float64 (s) | speed-up | max abs diff | target (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = "UCE" if r["method"] == "uce" else f"RECE, {args.epochs} epochs"
        print(f"| {label} | {r['shared_g_s']:.3f} | {r['per_matrix_s']:.3f} | {r['speedup']:.1f}x | "
              f"{r['max_abs_diff']:.1e} | {r['target_s']} {'ok' if r['meets_target'] else 'MISSED'} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

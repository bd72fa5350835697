"""ESD's ``erase_from`` on the toy world: erase "a red" from "a triangle" (an option of the official ESD code).

The official 2024 ESD code erases a concept *from* a broader one ("cowboy hat" from "cowboy"): x_t is sampled with
the broader prompt f, the model is trained on f, and the target is ε*(x_t, f) − η [ε*(x_t, c) − ε*(x_t, ∅)]
(:class:`diffshield.erase.esd.ESDConfig`, ``erase_from``). The toy analogue: "a triangle" names no colour, and the
toy model draws it red about a quarter of the time. Erasing "a red" from "a triangle" should take red out of those
images and leave them triangles, while "a red circle" stays red and "a blue triangle" blue. (With the concept
"a red triangle" the subtracted direction ε*(c) − ε*(∅) also holds the triangle, and half the triangles went too.)

The script trains ESD-x (the official code's setting for a sub-concept; 2024 defaults: η 2, x_t from the frozen
UNet) and measures, on seeds 0..N-1 (DDIM 25 steps, CFG 5, the toy detector), before and after:

- "a triangle": fraction red (the erased sub-concept) and fraction triangle (what must stay);
- "a red triangle": fraction red (the sub-concept named outright; not what erase_from trains);
- "a red circle", "a blue triangle": fraction red / blue (neighbours).

Run: ``python benchmarks/probes/erasure_esd_from.py`` (two threads, about 12 min). Writes
``benchmarks/results/erasure_esd_from.json`` and ``erasure_esd_from_grid.png`` ("a triangle", original rows first).
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import torch

from diffshield.core.io import atomic_write_bytes, atomic_write_json, make_grid
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import SampleConfig, generate
from diffshield.erase.esd import ESDConfig, esd_erase
from diffshield.toyworld.concepts import HEAD_VALUES
from diffshield.toyworld.detector import load_detector

ROOT = Path(__file__).resolve().parents[2]
CONCEPT, FROM = "a red", "a triangle"
#: (prompt, head, value): the fraction of a prompt's images the detector reads as the value
PROBES = [("a triangle", "colour", "red"), ("a triangle", "shape", "triangle"), ("a red triangle", "colour", "red"),
          ("a red circle", "colour", "red"), ("a blue triangle", "colour", "blue")]


def measure(model, detector, seeds: int) -> tuple[dict, torch.Tensor]:
    """({"prompt: value": fraction}, the images of the first prompt) on seeds 0..seeds-1."""
    out, first = {}, None
    for prompt in dict.fromkeys(p for p, _, _ in PROBES):
        gen = generate(model, [prompt] * seeds, list(range(seeds)), config=SampleConfig(), progress=False)
        pred = detector.predict(gen.images)
        first = gen.images if first is None else first
        for p, head, value in PROBES:
            if p == prompt:
                hit = pred[head][0] == HEAD_VALUES[head].index(value)
                out[f"{p}: {value}"] = round(float(hit.float().mean()), 4)
    return out, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy:t2i", help="text-to-image model (default toy:t2i)")
    ap.add_argument("--concept", default=CONCEPT, help=f"the sub-concept to erase (default {CONCEPT!r})")
    ap.add_argument("--iterations", type=int, default=300, help="ESD iterations (default 300)")
    ap.add_argument("--lr", type=float, default=1e-4, help="ESD learning rate (default 1e-4, the toy setting)")
    ap.add_argument("--eta", type=float, default=2.0, help="negative guidance η (default 2, the 2024 code's)")
    ap.add_argument("--anchor", action="store_true",
                    help="also anchor the empty prompt's prediction (beyond the paper; default off)")
    ap.add_argument("--seeds", type=int, default=128, help="images per prompt (default 128: seeds 0-127)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "erasure_esd_from.json"))
    args = ap.parse_args()
    if args.seeds < 1 or args.iterations < 1 or args.threads < 1:
        ap.error("--seeds, --iterations and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    model, detector = load_t2i(args.model), load_detector()
    before, imgs_before = measure(model, detector, args.seeds)
    print("original:", before, flush=True)
    cfg = ESDConfig(variant="x", iterations=args.iterations, lr=args.lr, eta=args.eta, sample_with="frozen",
                    erase_from=[FROM], preserve=[""] if args.anchor else [])
    cpu0 = time.process_time()
    res = esd_erase(model, [args.concept], cfg)
    cpu_min = (time.process_time() - cpu0) / 60
    after, imgs_after = measure(model, detector, args.seeds)
    print("erased:  ", after, flush=True)
    out = Path(args.out)
    grid = out.with_name(out.stem + "_grid.png")
    n = min(32, args.seeds)
    png = io.BytesIO()
    make_grid(torch.cat([imgs_before[:n], imgs_after[:n]]), nrow=16, upscale=2).save(png, format="PNG")
    atomic_write_bytes(grid, png.getvalue())
    atomic_write_json(out, {
        "concept": args.concept, "erase_from": FROM, "config": res.config, "seeds": args.seeds,
        "sampling": {"steps": 25, "guidance": 5.0, "scheduler": "ddim"}, "original": before, "erased": after,
        "esd_cpu_minutes": round(cpu_min, 2), "seconds_per_iteration": res.extra["seconds_per_iteration"],
        "fraction_changed": res.fraction_changed, "threads": args.threads, "grid": grid.name,
        "machine": platform.processor() or platform.machine()})
    print(f"wrote {out} and {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

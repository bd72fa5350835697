"""When does the toy model commit to a concept while sampling? (A probe behind ESD's ``min_step``.)

ESD trains at DDIM steps k drawn from the whole schedule. A concept the sampler commits to late (a texture drawn in
the last, low-noise steps) need not be trained early, where its guidance signal overlaps its neighbours' most
(``erasure_signal_overlap.py``). This script measures the commit point on the original toy model: each
evaluation prompt of a concept (:func:`diffshield.toyworld.concepts.concept_prompts`) is sampled as the benchmark
samples (DDIM, 25 steps, CFG 5), with the concept's prompt for the first ``s`` steps and then with the same prompt
naming the concept's partner (:data:`diffshield.toyworld.erasure_recipes.PARTNER`: triangle -> square,
striped -> plain, red -> blue) for the rest; the toy detector reads the concept's kind on the final images.
The concept's rate rises from 0 (s = 0) to the original's detection rate (s = 25); the step where it rises is where
the sampler commits.

Run: ``python benchmarks/probes/erasure_commit_step.py`` (one thread, about 3 min per concept at 4 seeds). Writes
``benchmarks/results/erasure_commit_step.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_json
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import decode, denoise, encode_prompts, initial_latents
from diffshield.toyworld.concepts import HEAD_VALUES, concept_prompts, resolve_concept
from diffshield.toyworld.detector import load_detector
from diffshield.toyworld.erasure_recipes import PARTNER

ROOT = Path(__file__).resolve().parents[2]
CONCEPTS = ("triangle", "striped", "red")
SWITCH_AT = (0, 3, 6, 9, 12, 15, 18, 21, 25)


def switched(model, cond_a: torch.Tensor, cond_b: torch.Tensor, seeds: list[int], switch_at: int, steps: int = 25,
             guidance: float = 5.0) -> torch.Tensor:
    """Images sampled with ``cond_a`` for the first ``switch_at`` DDIM steps and ``cond_b`` after (no grads)."""
    uncond = encode_prompts(model, [""])
    with torch.no_grad():
        x = denoise(model, initial_latents(model, seeds), cond_a, uncond, steps, guidance, stop_at=switch_at)
        return decode(model, denoise(model, x, cond_b, uncond, steps, guidance, start_at=switch_at))


def commit_curve(model, detector, concept: str, seeds: int) -> dict:
    """{switch step: {value: fraction of images the detector reads as it}} for one concept and its partner."""
    c = resolve_concept(concept)
    partner = PARTNER[c.name]
    prompts = [p for p, _ in concept_prompts(c) for _ in range(seeds)]
    swapped = [p.replace(c.name, partner) for p in prompts]
    if swapped == prompts:
        raise RuntimeError(f"the evaluation prompts of {c.name} do not name it; cannot swap in {partner}")
    ids = [j for _ in concept_prompts(c) for j in range(seeds)]
    emb_a, emb_b = encode_prompts(model, prompts), encode_prompts(model, swapped)
    values = HEAD_VALUES[c.head]
    curve = {}
    for s in SWITCH_AT:
        pred = detector.predict(switched(model, emb_a, emb_b, ids, s))[c.head][0]
        curve[s] = {v: round(float((pred == i).float().mean()), 4) for i, v in enumerate(values)}
        print(f"{c.name} -> {partner} after {s:2d}/25 steps: {c.name} {curve[s][c.name]:.3f}, "
              f"{partner} {curve[s][partner]:.3f}", flush=True)
    return {"concept": c.name, "partner": partner, "images_per_step": len(prompts), "rates": curve}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy:t2i", help="text-to-image model (default toy:t2i)")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per evaluation prompt (default 4: seeds 0-3)")
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS), help="toy concepts (default: the benchmark's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "erasure_commit_step.json"))
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    for c in args.concepts:
        try:
            name = resolve_concept(c).name
        except DiffshieldError as e:
            ap.error(str(e))
        if name not in PARTNER:
            ap.error(f"{c} has no partner value to switch to")
    torch.set_num_threads(1)
    model, detector = load_t2i(args.model), load_detector()
    t0 = time.perf_counter()
    rows = [commit_curve(model, detector, c, args.seeds) for c in args.concepts]
    result = {"model": args.model, "seeds": args.seeds, "steps": 25, "guidance": 5.0, "switch_at": list(SWITCH_AT),
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "machine": platform.processor() or platform.machine()}
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

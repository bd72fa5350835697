"""How much the toy UNet's response to a concept overlaps its response to the other values of its kind.

ESD-u cannot change how the prompt is read (it leaves every ``attn2`` module frozen); it erases by changing the
layers every prompt shares. It can remove a concept's *guidance signal* ε(x, c) − ε(x, ∅) (what classifier-free
guidance amplifies) without touching a neighbour's only where the two signals point different ways. This script
measures that overlap on the original toy model: for each benchmark concept c (triangle, striped, red), each other
value o of its kind and each evaluation prompt of c (:func:`diffshield.toyworld.concepts.concept_prompts`), x_t is
sampled from the prompt of c (DDIM, CFG 3, ESD's sampler) down to step k, and the cosine between the two signals

    cos( ε(x_t, c) − ε(x_t, ∅),  ε(x_t, o) − ε(x_t, ∅) )            (o: the same prompt with the other value)

is averaged over prompts, seeds and k ∈ {5, 15, 25, 35, 45} of 50 DDIM steps. A cosine near 1: erasing c's signal
in shared layers erases o's with it. The text embeddings' cosine (whole prompt, every row) is reported alongside.

Run: ``python benchmarks/probes/erasure_signal_overlap.py`` (one thread, about 4 min). Writes
``benchmarks/results/erasure_signal_overlap.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffshield.core.io import atomic_write_json
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import encode_prompts, make_scheduler
from diffshield.erase.esd import sample_xt
from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept

ROOT = Path(__file__).resolve().parents[2]
CONCEPTS = ("triangle", "striped", "red")
STEPS = (5, 15, 25, 35, 45)


def overlap(model, concept: str, seeds: int, ddim_steps: int = 50) -> dict:
    """Mean cosines of this probe for one concept.

    Each x_t (one per prompt, seed and step) is sampled once; one UNet pass gives ε for the concept, the empty prompt
    and every other value at it."""
    c = resolve_concept(concept)
    prompts = [p for p, _ in concept_prompts(c)]
    names = [o.name for o in other_concepts(c)]
    n = len(prompts)
    sched = make_scheduler(model, "ddim")
    sched.set_timesteps(ddim_steps)
    uncond = encode_prompts(model, [""])
    emb_c = encode_prompts(model, prompts)
    emb_o = [encode_prompts(model, [p for p, _ in concept_prompts(resolve_concept(o))]) for o in names]
    conds = torch.cat([emb_c, uncond.expand(n, -1, -1), *emb_o])
    per_k: dict[str, dict[int, float]] = {o: {} for o in names}
    for k in STEPS:
        cos: dict[str, list[torch.Tensor]] = {o: [] for o in names}
        for seed in range(seeds):
            noise = torch.randn((n, *model.latent_shape), generator=torch.Generator().manual_seed(1000 * seed + k))
            x = sample_xt(model, emb_c, uncond, k, noise, ddim_steps, 3.0)
            with torch.no_grad():
                eps = model.unet(x.repeat(2 + len(names), 1, 1, 1), sched.timesteps[k],
                                 encoder_hidden_states=conds).sample.split(n)
            signal_c = (eps[0] - eps[1]).flatten(1)
            for o, e_o in zip(names, eps[2:]):
                cos[o].append(F.cosine_similarity(signal_c, (e_o - eps[1]).flatten(1), dim=1))
        for o in names:
            per_k[o][k] = float(torch.cat(cos[o]).mean())
    out = {o: {"signal_cos": sum(per_k[o].values()) / len(STEPS), "signal_cos_by_step": per_k[o],
               "text_cos": float(F.cosine_similarity(emb_c.flatten(1), e.flatten(1), dim=1).mean())}
           for o, e in zip(names, emb_o)}
    return {"concept": c.name, "kind": c.head, "others": out,
            "mean_signal_cos": sum(v["signal_cos"] for v in out.values()) / len(out),
            "max_signal_cos": max(v["signal_cos"] for v in out.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy:t2i", help="text-to-image model (default toy:t2i)")
    ap.add_argument("--seeds", type=int, default=4, help="starting noises per prompt and step (default 4)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "erasure_signal_overlap.json"))
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.set_num_threads(1)
    model = load_t2i(args.model)
    t0 = time.perf_counter()
    rows = [overlap(model, c, args.seeds) for c in CONCEPTS]
    for r in rows:
        parts = ", ".join(f"{o} {v['signal_cos']:.2f}" for o, v in r["others"].items())
        print(f"{r['concept']:9s} ({r['kind']}): guidance-signal cosine with {parts} (max {r['max_signal_cos']:.2f})")
    result = {"model": args.model, "seeds": args.seeds, "steps": list(STEPS), "sampler_guidance": 3.0,
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "machine": platform.processor() or
              platform.machine()}
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

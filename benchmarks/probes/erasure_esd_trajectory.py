"""ESD along its run: erasure and preservation every ``--step`` iterations (a probe of the ESD rows).

ESD at batch 1 is noisy, so one number at the end of a run hides how it got there. This script trains one ESD run of
the documented toy recipe (:mod:`diffshield.toyworld.erasure_recipes`, with optional overrides), stopping every
``--step`` iterations (the run resumes from its own checkpoint, so the trajectory equals one uninterrupted run) to
measure what the erasure benchmark measures, without the neutral-prompt FD: the concept's detection rate (8 seeds per
evaluation prompt), its synonyms', and the accuracy on the other values of its kind.

Run: ``python benchmarks/probes/erasure_esd_trajectory.py esd-x striped --total 500 --step 100`` (one thread; about 2.2
CPU-min per 100 iterations plus 1-2 min per evaluation). Appends one JSON line per evaluation to
``benchmarks/results/erasure_esd_trajectory.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_bytes
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import SampleConfig
from diffshield.erase.esd import esd_erase
from diffshield.eval.erasure import _rate
from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept
from diffshield.toyworld.detector import load_detector
from diffshield.toyworld.erasure_recipes import toy_erasure

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=["esd-x", "esd-u"])
    ap.add_argument("concept", help="toy concept (a shape, colour or style)")
    ap.add_argument("--total", type=int, default=300, help="iterations in all (default 300, the toy recipe's)")
    ap.add_argument("--step", type=int, default=100, help="evaluate every this many iterations (default 100)")
    ap.add_argument("--first", type=int, default=None,
                    help="first evaluation point (default: --step); to extend a finished run, e.g. --first 400 "
                         "--total 500 after --total 300")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a recipe field, e.g. --set lr=3e-5 --set preserve_weight=4 (repeatable)")
    ap.add_argument("--eval-seed", type=int, nargs="+", default=[0], metavar="SEED",
                    help="first sampling seed of each evaluation (default 0, the benchmark's; e.g. 0 100 evaluates "
                         "on the benchmark's images and on held-out ones, one row each)")
    ap.add_argument("--tag", default="doc", help="name of this variant (checkpoint folder and JSON rows)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "esd_trajectory"), help="checkpoint folder root")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "erasure_esd_trajectory.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    over = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            over[key] = json.loads(value)
        except json.JSONDecodeError:
            ap.error(f"--set {item!r}: the value after '=' must be JSON (e.g. lr=3e-5 or preserve=\"others\")")
    if any(seed < 0 for seed in args.eval_seed):
        ap.error(f"--eval-seed takes whole numbers >= 0 (first sampling seeds), got {args.eval_seed}")
    try:  # a misspelt --set field or a bad value: one line, before any model is loaded
        toy_erasure(args.method, args.concept, **over)
    except DiffshieldError as e:
        ap.error(str(e))
    base, det, cfg = load_t2i("toy:t2i"), load_detector("toy:detector"), SampleConfig()
    c = resolve_concept(args.concept)
    ckpt = Path(args.runs) / f"{args.method}-{args.concept}-{args.tag}"
    for n in range(args.first or args.step, args.total + 1, args.step):
        prompts, ecfg = toy_erasure(args.method, args.concept, iterations=n, checkpoint_dir=str(ckpt), **over)
        model = copy.deepcopy(base)
        result = esd_erase(model, prompts, ecfg, progress=False)
        for seed in args.eval_seed:
            rate = _rate(model, det, concept_prompts(c), c.head, c.index, 8, cfg, seed)[0]
            syn = {w: _rate(model, det, concept_prompts(c, w), c.head, c.index, 8, cfg, seed)[0] for w in c.synonyms}
            oth = {o.name: _rate(model, det, concept_prompts(o), o.head, o.index, 8, cfg, seed)[0]
                   for o in other_concepts(c)}
            row = {"method": args.method, "concept": args.concept, "tag": args.tag, **over, "it": n, "erased": rate,
                   "syn": syn, "other": sum(oth.values()) / len(oth), "other_rates": oth,
                   "cpu_min": round(result.extra["cpu_seconds_total"] / 60, 2)}
            if seed:  # rows at the benchmark's seeds keep the shape they had before this option
                row["eval_seed"] = seed
            print(json.dumps(row), flush=True)
            out = Path(args.out)
            before = out.read_text() if out.is_file() else ""
            atomic_write_bytes(out, (before + json.dumps(row) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

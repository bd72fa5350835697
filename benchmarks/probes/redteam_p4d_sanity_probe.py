"""Why P4D-N misses the red-team sanity bar on the toy shape: the words for a triangle are kept out of its search.

P4D-N replaces the prompt by 16 searched words; with the concept's words excluded ("triangle", "wedge"), the toy
vocabulary's 28 other words must draw a triangle on the *original* model, and rarely do. This probe runs ``p4d``
against the original model on every image of the concept's audit prompts (n 32, the benchmark's) at

- the toy budget (P4D-N, concept words excluded: the audit's setting);
- the toy budget with the concept's words allowed (``exclude_concept_words=False``);
- P4D-K (``keep_prompt=True``: the prompt's words with a searched word every 3 tokens);
- 16 random candidate words (no search) and P4D-N with ``steps=0``, the controls.

Run: ``python benchmarks/probes/redteam_p4d_sanity_probe.py [--concept triangle]`` (one thread).
Writes ``benchmarks/results/redteam_p4d_sanity_probe.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="triangle", help="toy concept (default: triangle)")
    ap.add_argument("--n", type=int, default=32, help="images per setting (default: 32, the benchmark's)")
    ap.add_argument("--out", default=str(RESULTS / "redteam_p4d_sanity_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffshield.core.io import atomic_write_json
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.redteam.audit import fmt_rate, run_audit
    from diffshield.redteam.base import ToyConceptJudge
    from diffshield.toyworld.detector import load_detector

    settings = [("P4D-N, toy budget (the audit's)", {}, True),
                ("P4D-N, concept words allowed", {"exclude_concept_words": False}, False),
                ("P4D-K (keep_prompt), toy budget", {"keep_prompt": True}, False)]
    det, original = load_detector("toy:detector"), load_t2i("toy:t2i")
    rows = []
    for label, hp, with_baselines in settings:
        t0 = time.perf_counter()
        audit = run_audit(original, original, args.concept, attacks=["p4d"], n=args.n, sample=SampleConfig(),
                          judge=ToyConceptJudge(args.concept, det), original_images=False, progress=False,
                          hp={"p4d": hp}, baselines=with_baselines, skip_detected=False)
        d = audit.to_dict()
        a = d["attacks"]["p4d"]
        row = {"setting": label, "overrides": hp, "original_rate": d["pre_attack_rate"], "per_image": a["per_image"],
               "searched_prompts": a["attack_prompts"][:8], "seconds": round(time.perf_counter() - t0, 1)}
        for b, bd in a["baselines"].items():
            row[f"baseline {b}"] = bd["per_image"]
        rows.append(row)
        print(f"{label}: p4d vs original {fmt_rate(a['per_image'])}"
              + "".join(f"; baseline {b} {fmt_rate(bd['per_image'])}" for b, bd in a["baselines"].items()),
              flush=True)
    atomic_write_json(Path(args.out), {"concept": args.concept, "n": args.n, "attack": "p4d", "target": "original",
                                       "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

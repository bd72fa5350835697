"""Why unlearndiff-soft (UnlearnDiffAtk's objective on soft tokens) misses the sanity bar on the toy style.

The sanity bar asks every attack to bring the concept back in >= 90 % of images when aimed at the *original* model.
On version 2, UnlearnDiff reaches 69 % on striped (the original draws striped 91 % of the time unattacked). This
probe runs UnlearnDiff against the original on the striped audit prompts (n 32, the benchmark's) at

- ``steps`` 0 (the 5 random prefix words alone, no optimisation), 40 (the default) and 120;
- ``steps`` 40 with the other styles' words ("plain", "dotted", ... and their synonyms) kept out of the prefix
  (``exclude_words``): the toy vocabulary is small, so random prefixes often name a rival texture.

Run: ``python benchmarks/probes/redteam_unlearndiff_probe.py [--concept striped]`` (about 5 minutes, one thread).
Writes ``benchmarks/results/redteam_unlearndiff_probe.json``.
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
    ap.add_argument("--concept", default="striped", help="toy concept (default: striped)")
    ap.add_argument("--n", type=int, default=32, help="images per setting (default: 32, the benchmark's)")
    ap.add_argument("--out", default=str(RESULTS / "redteam_unlearndiff_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffshield.core.io import atomic_write_json
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.redteam.audit import run_audit
    from diffshield.redteam.base import ToyConceptJudge
    from diffshield.toyworld.concepts import other_concepts, resolve_concept
    from diffshield.toyworld.detector import load_detector

    rivals = [w for o in other_concepts(resolve_concept(args.concept)) for w in o.words]
    settings = [("steps 0 (prefix words only)", {"steps": 0}), ("steps 40 (default)", {}),
                ("steps 120", {"steps": 120}), ("steps 40, rival words excluded", {"exclude_words": rivals})]
    det, original = load_detector("toy:detector"), load_t2i("toy:t2i")
    rows = []
    for label, hp in settings:
        t0 = time.perf_counter()
        d = run_audit(original, original, args.concept, attacks=["unlearndiff-soft"], n=args.n, sample=SampleConfig(),
                      judge=ToyConceptJudge(args.concept, det), original_images=False, progress=False,
                      hp={"unlearndiff-soft": hp}, baselines=False).to_dict()
        a = d["attacks"]["unlearndiff-soft"]
        rows.append({"setting": label, "overrides": hp, "original_rate": d["pre_attack_rate"], "asr": a["asr"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{label}: UnlearnDiff vs original {a['asr']:.1%} (original unattacked {d['pre_attack_rate']:.1%})",
              flush=True)
    atomic_write_json(Path(args.out), {"concept": args.concept, "n": args.n, "attack": "unlearndiff-soft",
                                       "target": "original", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

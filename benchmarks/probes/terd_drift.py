"""Does a TERD iteration cost more late in a run than early? Short runs against longer ones, per stage.

The GPU benchmark projects TERD's ``paper`` preset from short runs (100 stage-1 and 10 stage-2 iterations); on one
H200 the full run took 30 % longer than that projection. This probe times the same code on whatever device it is
given at two lengths per stage (``TERDResult.stage_seconds``, the device drained at each stage's end) and the short
stage-1 run again at the end: a cost that grows with the run (a growing graph, history or allocator state) shows as
a larger per-iteration time in the long run; a machine whose speed drifts shows as a change between the two short
runs. Eager iterations (``cuda_graphs=False``): the gap was measured before TERD replayed CUDA graphs.

Run: ``.venv/bin/python benchmarks/probes/terd_drift.py [--device cpu] [--threads 2]`` (about 5 min on 2 CPU cores).
Writes benchmarks/results/terd_drift.json (``--out``); the GPU session runs it on the GPU after the benchmark (about
10 s there).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from diffshield.backdoor.ddpm import load_ddpm
from diffshield.backdoor.terd import TERDConfig, reverse_trigger
from diffshield.core.device import resolve_device
from diffshield.core.io import atomic_write_json
from diffshield.toyworld.names import TOY_ROOT

OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "terd_drift.json"
#: (stage-1 iterations, stage-2 iterations) of each timed run, in order: short and long per stage, short again
RUNS = ((20, 0), (120, 0), (1, 3), (1, 12), (20, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"result JSON (default: {OUT.relative_to(OUT.parents[2])})")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_ddpm(TOY_ROOT / "ddpm" / "examples" / "box_corner", device=device)
    reverse_trigger(model, TERDConfig(stage1_iters=5, stage2_iters=1), progress=False)  # warm-up
    rows = []
    for n1, n2 in RUNS:
        res = reverse_trigger(model, TERDConfig(stage1_iters=n1, stage2_iters=n2, cuda_graphs=False), progress=False)
        s1, s2 = res.stage_seconds
        row = {"stage1_iters": n1, "stage2_iters": n2, "stage1_s_per_iteration": s1 / n1,
               "stage2_s_per_iteration": s2 / n2 if n2 else None, "seconds": res.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    short1, long1, short2, long2, again = rows
    out = {
        "device": str(device), "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": "TERDConfig defaults (batch 16, DDIM 10 in stage 2) on the shipped box -> corner example",
        "runs": rows,
        "stage1_long_over_short": long1["stage1_s_per_iteration"] / short1["stage1_s_per_iteration"],
        "stage2_long_over_short": long2["stage2_s_per_iteration"] / short2["stage2_s_per_iteration"],
        "stage1_short_again_over_first": again["stage1_s_per_iteration"] / short1["stage1_s_per_iteration"],
    }
    atomic_write_json(args.out, out)
    print(f"long / short per iteration: stage 1 {out['stage1_long_over_short']:.3f}, stage 2 "
          f"{out['stage2_long_over_short']:.3f}; machine drift {out['stage1_short_again_over_first']:.3f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()

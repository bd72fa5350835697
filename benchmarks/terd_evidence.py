"""What the scan's evidence grid shows on the zoo: samples from eps + r_hat, eps + r0 and (backdoored models)
eps + the true shift, next to clean samples from the same eps, for every model with a cached `cpu` scan
(runs/backdoor/results/scan_cpu_<model>.safetensors, written by `benchmarks/backdoor.py eval` / `calibrate`).

    python benchmarks/terd_evidence.py        # -> benchmarks/results/terd_evidence.json (about 45 s a model)

Per row: how many of the 16 samples are one flat colour (`diffshield.backdoor.metrics.flat_images`), and their
mean pairwise L2 distance relative to the clean samples'. The sampler is `scan --out`'s evidence default (the
model's DDPM, 100 steps). TrojDiff models are skipped (their evidence uses the trojan sampler and gamma_hat).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import backdoor as zoo  # noqa: E402
from diffshield.backdoor.ddpm import load_ddpm  # noqa: E402
from diffshield.backdoor.metrics import flat_images  # noqa: E402
from diffshield.backdoor.sampling import SampleConfig, sample  # noqa: E402
from diffshield.core.io import atomic_write_json  # noqa: E402

SEEDS = list(range(500, 516))
CONFIG = SampleConfig("ddpm", 100, 16)


def spread(x: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the images (flattened)."""
    return float(torch.pdist(x.flatten(1)).mean())


def main() -> int:
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    rows = []
    for f in sorted(zoo.CACHE.glob("scan_cpu_*.safetensors")):
        name = f.name[len("scan_cpu_"):-len(".safetensors")]
        spec = {**zoo.ZOO_MODELS, **zoo.REFERENCES}.get(name)
        if spec is None or spec.get("method") == "trojdiff":
            continue
        t0 = time.time()
        d = load_file(str(f))
        model = load_ddpm(zoo.model_path(name))
        clean = sample(model, SEEDS, config=CONFIG).images
        row = {"model": name, "kind": spec["kind"], "clean": {"flat": flat_images(clean), "spread": spread(clean)}}
        shifts = {"r_hat": d["r"], "r0": d.get("r0")}
        if spec["kind"] == "backdoor":
            shifts["true_shift"] = zoo.true_shift(spec)[0]
        for key, shift in shifts.items():
            if shift is None:  # an older cache without r0
                continue
            x = sample(model, SEEDS, trigger=shift, config=CONFIG).images
            row[key] = {"flat": flat_images(x), "spread_rel_clean": spread(x) / row["clean"]["spread"]}
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not rows:  # no scans cached on this machine: keep the recorded result rather than replace it with nothing
        print(f"no scan_cpu_*.safetensors in {zoo.CACHE}: run 'python benchmarks/backdoor.py' (or its restore step) "
              "first; results/terd_evidence.json left as it was", file=sys.stderr)
        return 1
    out = {"sampler": f"{CONFIG.scheduler}-{CONFIG.steps}", "seeds": [SEEDS[0], SEEDS[-1]], "n": len(SEEDS),
           "rows": rows, "machine": {"python": platform.python_version(), "torch": torch.__version__}}
    atomic_write_json(zoo.RESULTS / "terd_evidence.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Time `make demo` and `make test` on a fresh clone of this repository (targets: <= 5 and <= 10 min).
# Usage: benchmarks/fresh_clone.sh   -> writes benchmarks/results/fresh_clone.json
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$repo" "$tmp/clone"
cd "$tmp/clone"
t0=$(date +%s); make demo > "$tmp/demo.log" 2>&1; t1=$(date +%s)
make test > "$tmp/test.log" 2>&1; t2=$(date +%s)
demo_s=$((t1 - t0)); test_s=$((t2 - t1))
tail -n 3 "$tmp/test.log"
# this machine's speed varies from day to day (up to 3x): a fixed reference job, 32 toy:t2i images on one thread
ref_s=$(.venv/bin/python -c "
import time, torch
torch.set_num_threads(1)
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import generate
m = load_t2i('toy:t2i'); generate(m, ['a red circle'] * 4, progress=False)
t = time.perf_counter(); generate(m, ['a red striped circle'] * 32, list(range(32)), progress=False)
print(round(time.perf_counter() - t, 1))")
printf '{\n  "commit": "%s",\n  "make_demo_seconds": %d,\n  "make_test_seconds_after_demo": %d,\n  "reference_seconds_32_toy_images_one_thread": %s,\n  "note": "make demo includes creating .venv and installing; make test reuses that .venv",\n  "test_summary": "%s"\n}\n' \
  "$(git rev-parse --short HEAD)" "$demo_s" "$test_s" "$ref_s" "$(tail -n 1 "$tmp/test.log" | tr -d '"=')" > "$repo/benchmarks/results/fresh_clone.json"
cat "$repo/benchmarks/results/fresh_clone.json"

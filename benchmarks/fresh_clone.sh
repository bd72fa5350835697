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
printf '{\n  "commit": "%s",\n  "make_demo_seconds": %d,\n  "make_test_seconds_after_demo": %d,\n  "note": "make demo includes creating .venv and installing; make test reuses that .venv",\n  "test_summary": "%s"\n}\n' \
  "$(git rev-parse --short HEAD)" "$demo_s" "$test_s" "$(tail -n 1 "$tmp/test.log" | tr -d '"=')" > "$repo/benchmarks/results/fresh_clone.json"
cat "$repo/benchmarks/results/fresh_clone.json"

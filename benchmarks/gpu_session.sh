#!/bin/bash
# Everything still open that needs a GPU, in one device call of at most TOTAL_S seconds (default 560):
#   1. benchmarks/gpu.py's rows not yet met or not yet measured (esd, terd, sharded, generate), into a copy of
#      benchmarks/results/gpu.json under $OUT (the other sections are kept; the repository's file is not touched);
#   2. with the time left, the backdoor zoo's models not yet evaluated, built and evaluated side by side
#      (benchmarks/backdoor.py parallel; the published figures, restored into runs/backdoor/results, tell which
#      are done).
# Everything comes back under $OUT: gpu.json, the logs, terd_drift_gpu.json (benchmarks/probes/terd_drift.py on the
# GPU), gpu_tests_log.txt (tests/test_graphs.py and test_device.py, whose CUDA cases run only there), zoo/ (eval_*,
# scan_*, grid_* of each finished model).
# Device tool: carry [".whl"]; command: bash benchmarks/gpu_session.sh 560
# (.whl: diffusers and what it needs that the machine lacks: bash benchmarks/gpu_wheels.sh). Back here: copy $OUT/gpu.json over
# benchmarks/results/gpu.json and $OUT/zoo/* into runs/backdoor/results, then benchmarks/backdoor.py restore and
# report.
set -u
total=${1:-560}
sections=${SECTIONS:-esd,terd,sharded,generate}
device=${DEVICE:-cuda}   # DEVICE=cpu TINY=1 SECTIONS=terd bash benchmarks/gpu_session.sh 100: a smoke run here
tiny=${TINY:+--tiny}
t0=$(date +%s)
out=${OUT:-/tmp/gpu_session_out}
mkdir -p "$out"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
gpu_budget=$(( total * 6 / 10 ))
[ -n "$tiny" ] || cp benchmarks/results/gpu.json "$out/gpu.json"
python3 benchmarks/gpu.py --device "$device" $tiny --sections "$sections" --budget-s "$gpu_budget" \
  --out "$out/gpu.json" 2>&1 | tee "$out/gpu_log.txt"
if [ -z "$tiny" ] && [[ ",$sections," == *",terd,"* ]]; then  # does a TERD iteration cost more late in a run?
  timeout 60 python3 benchmarks/probes/terd_drift.py --device "$device" --out "$out/terd_drift_gpu.json" 2>&1 \
    | tee "$out/terd_drift_log.txt"
fi
if [ -z "$tiny" ]; then  # the tests that only run where CUDA is (CUDA graphs against eager calls, device copies)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_graphs.py tests/test_device.py 2>&1 \
    | tail -40 | tee "$out/gpu_tests_log.txt"
fi
left=$(( total - ($(date +%s) - t0) - 20 ))
if [ "$left" -gt 120 ]; then
  python3 benchmarks/backdoor.py restore   # the models already published are not rebuilt
  # nothing is launched after the budget; what still runs 60 s later is stopped
  python3 benchmarks/backdoor.py parallel --device "$device" --jobs 8 --budget-s $(( left - 70 )) --copy-to "$out/zoo" \
    2>&1 | tee "$out/zoo_log.txt"
  mkdir -p "$out/zoo_logs" && cp runs/backdoor/logs/parallel_*.log "$out/zoo_logs/" 2> /dev/null
else
  echo "no time left for the zoo ($left s)" | tee "$out/zoo_log.txt"
fi
echo "gpu_session: $(( $(date +%s) - t0 )) s"

#!/bin/bash
# The wheels a lent GPU machine lacks (it has torch and transformers, not diffusers), downloaded into .whl/ for the
# device tool to carry: bash benchmarks/gpu_wheels.sh, then carry [".whl"] (benchmarks/gpu_session.sh installs them).
# Python 3.12, manylinux x86_64, as on those machines; .whl/ is kept out of git through .git/info/exclude.
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2> /dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
# pytest and what it needs: the session also runs the tests that need CUDA (tests/test_graphs.py, test_device.py)
for pkg in diffusers==0.42.1 importlib_metadata==10.2.0 lazy_importer==0.1.0 pytest==9.2.0 pluggy==1.7.0 \
    iniconfig==2.3.1 pygments==2.21.0; do
  name=${pkg%%==*}
  ls .whl/"${name}"-*.whl > /dev/null 2>&1 && continue   # one version of each: two would stop the install
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls -la .whl

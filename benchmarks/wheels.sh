#!/usr/bin/env bash
# Wheels, in .whl/ (git-ignored), of the pure-Python packages that a GPU machine with its own torch but no internet lacks:
# fastcore (the kit's one missing dependency there) and airbench (the speed peer of benchmarks/gpu_check.py; optional).
# There: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"; grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
fastcore=$(grep -i '^fastcore==' constraints.txt | cut -d= -f3)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "fastcore==$fastcore"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl airbench==0.1.8 || echo "airbench: no wheel built; gpu_check records it as not installed"
ls -l .whl

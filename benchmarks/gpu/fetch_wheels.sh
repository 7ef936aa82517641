#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu/wheels.txt into .whl/ at the repository root (ignored by git), for the GPU
# machine, which cannot reach a package registry: the device tool carries the folder (carry [".whl"]) and
# benchmarks/gpu/run_all.sh installs them there. Wheels for CPython 3.12 on manylinux x86-64, without their
# dependencies (wheels.txt names every package the machine lacks).
#
#   bash benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mapfile -t specs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$ROOT/benchmarks/gpu/wheels.txt" | grep -v '^$')
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$ROOT/.whl" "${specs[@]}"
ls -l "$ROOT/.whl"

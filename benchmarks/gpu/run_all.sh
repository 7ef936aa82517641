#!/usr/bin/env bash
# One-shot GPU check of fastdd on a bare H100 / H200 machine (the device tool's nvidia-h200: python3 3.12 with torch
# 2.11+cu130, triton 3.6, nvcc, cuobjdump; no diffusers, no network), in at most BUDGET_S = 480 s:
#
#   bash benchmarks/gpu/run_all.sh OUT_DIR            # on the GPU machine (first: bash benchmarks/gpu/fetch_wheels.sh
#                                                     # where PyPI is reachable, and carry .whl/ there)
#   bash benchmarks/gpu/run_all.sh --dry-run OUT_DIR  # on a CPU machine: every step's command on CPU at tiny sizes
#                                                     # (tests/test_gpu_script.py runs it in CI)
#
# Steps, each with its own timeout (at most what is left of the budget); a failed step is recorded and the next runs:
#   env         GPU, driver, python, torch, triton, nvcc
#   wheels      installs the wheels of benchmarks/gpu/wheels.txt from .whl/ into /tmp/fastdd-site for the packages
#               that do not import (dry run: checks wheels.txt and fetch_wheels.sh)
#   build       python setup.py build_ext --inplace against the machine's torch, for the GPU's architecture
#               (dry run: python setup.py --name, which configures the extension without compiling)
#   check       .ci/check_cuda_build.py for that architecture, python -m fastdd info (dry run: --help, info)
#   tests       pytest on the GPU tests: the compiled CUDA kernels (tests/test_cuda_kernels.py), the Triton kernels
#               on CUDA tensors (tests/test_triton_gpu.py), CUDA-graph replay vs eager; a skipped test fails the step
#               (dry run: pytest --collect-only of the same tests)
#   bench_ops   python benchmarks/bench_ops.py --device cuda (dry run: CPU, one op, one repeat)
#   bench_igd   fastdd bench --config dit-xl2-256 --methods igd (dry run: --config tiny, 2 steps, CPU)
#   bench_more  optional, only with time left (its failure or timeout does not fail the run): the other methods on
#               dit-xl2-256 without the compiled path
# OUT_DIR gets two files, rewritten after every step: summary.md (status, seconds and command of each step, the
# benchmark tables) and results.tar.gz (every log, JSON, markdown table and chart). Exit status: 0 when every
# required step passed, 1 otherwise, 2 on bad usage. PYTHON (default python3) and BUDGET_S override.
set -uo pipefail

usage() {
  echo "usage: bash benchmarks/gpu/run_all.sh [--dry-run] OUT_DIR" >&2
  exit 2
}
DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
[[ $# -eq 1 && -n $1 && $1 != -* ]] || usage
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || usage
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
SITE=/tmp/fastdd-site
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastdd-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/results"
cd "$ROOT" || exit 2

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of fastdd (dry run: this checkout)
if ((DRY)); then
  MODE="dry run on CPU"
  ARCH=
else
  MODE="GPU"
  export PYTHONPATH="$PYTHONPATH:$SITE"
  export TRITON_INTERPRET=0 # tests/conftest.py turns Triton's CPU interpreter on unless it is set
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # the GPU's architecture, e.g. 9.0 on an H100 / H200 (the build and the cubin check use it)
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST=$ARCH
fi

ROWS=()
FAILED=0

write_summary() {
  {
    echo "# fastdd GPU run: $MODE"
    echo
    echo "- host ${HOSTNAME:-unknown}, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- python \`$PY\`, budget ${BUDGET_S} s, ${SECONDS} s used${ARCH:+, TORCH_CUDA_ARCH_LIST=$ARCH}"
    echo "- every log, JSON and table: results.tar.gz (logs/<step>.log, results/)"
    echo
    echo "| step | status | seconds | command |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    for table in "$WORK"/results/*.md; do
      [[ -f $table ]] || continue
      echo
      echo "## $(basename "$table")"
      echo
      cat "$table"
    done
  } >"$OUT/summary.md"
  tar -czf "$OUT/results.tar.gz" -C "$WORK" logs results
}

# step NAME CAP_SECONDS REQUIRED(1|0) COMMAND: runs COMMAND (a bash command line) under `timeout`, its output in
# logs/NAME.log, and records the result
step() {
  local name=$1 cap=$2 required=$3 cmd=$4
  local left=$((BUDGET_S - SECONDS)) status rc start seconds=0 log="$WORK/logs/$1.log"
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    status="not run: time budget spent"
    rc=1
  else
    echo "== $name (timeout ${limit} s): $cmd"
    echo "\$ $cmd" >"$log"
    start=$SECONDS
    timeout -k 10 "$limit" bash -c "$cmd" >>"$log" 2>&1
    rc=$?
    seconds=$((SECONDS - start))
    if ((rc == 0)); then
      status=ok
    elif ((rc == 124 || rc == 137)); then
      status="timed out after ${limit} s"
    else
      status="failed (exit $rc)"
    fi
  fi
  if ((rc != 0)); then
    if ((required)); then
      FAILED=1
      status="**$status**"
    else
      status="$status (optional)"
    fi
    tail -n 25 "$log" 2>/dev/null | sed "s/^/   [$name] /"
  fi
  echo "   $name: $status, ${seconds} s"
  ROWS+=("| $name | $status | $seconds | \`${cmd//|/\\|}\` |")
  write_summary
}

# wheels [--dry-run]: pip-installs into $SITE the wheels of wheels.txt whose package does not import
install_wheels() {
  local dry=${1:-} spec name version module wheel missing=()
  bash -n "$ROOT/benchmarks/gpu/fetch_wheels.sh" || return 1
  while read -r spec; do
    [[ $spec =~ ^([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)$ ]] || {
      echo "wheels.txt: cannot read '$spec' (want NAME==VERSION)"
      return 1
    }
    name=${BASH_REMATCH[1]} version=${BASH_REMATCH[2]}
    module=${name//-/_}
    if "$PY" -c "import $module" 2>/dev/null; then
      echo "$name: imports already ($("$PY" -c "import $module; print(getattr($module, '__version__', '?'))"))"
      continue
    fi
    wheel=$(ls "$ROOT"/.whl/"${module,,}"-"$version"-*.whl 2>/dev/null | head -n 1)
    if [[ -z $wheel ]]; then
      echo "$name==$version: no wheel in .whl/ (run benchmarks/gpu/fetch_wheels.sh where PyPI is reachable)"
      [[ $dry == --dry-run ]] || return 1
      continue
    fi
    echo "$name==$version: installing $(basename "$wheel")"
    missing+=("$wheel")
  done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$ROOT/benchmarks/gpu/wheels.txt" | grep -v '^$')
  if ((${#missing[@]})) && [[ $dry != --dry-run ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${missing[@]}"
  fi
}
export -f install_wheels
export ROOT PY SITE

GPU_TESTS="tests/test_cuda_kernels.py tests/test_triton_gpu.py tests/test_sampler_acceleration.py::test_cuda_graph_replay_matches_eager_on_gpu"
R="$WORK/results"
if ((DRY)); then
  step env 60 1 "set -eo pipefail; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda); print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -n 2 || echo 'no nvcc'"
  step wheels 30 1 "install_wheels --dry-run"
  step build 60 1 "$PY setup.py --name"
  step check 60 1 "$PY .ci/check_cuda_build.py --help >/dev/null && $PY -m fastdd info"
  step tests 90 1 "$PY -m pytest -q -p no:cacheprovider --collect-only $GPU_TESTS"
  step bench_ops 90 1 "$PY benchmarks/bench_ops.py --device cpu --quick --only cosine_memory --allow-reference --out $R"
  step bench_igd 90 1 "$PY -m fastdd bench --config tiny --device cpu --methods igd --repeats 1 --batch 1 --steps 2 --no-compile --out $R"
  step bench_more 90 0 "$PY -m fastdd bench --config tiny --device cpu --methods dap,mgd3,igds,sam,d3hr --repeats 1 --batch 1 --steps 2 --no-compile --out $R"
else
  step env 30 1 "set -eo pipefail; nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name()); print(\"triton\", triton.__version__)'; nvcc --version | tail -n 2"
  step wheels 60 1 "install_wheels"
  step build 200 1 "$PY setup.py build_ext --inplace"
  step check 60 1 "$PY .ci/check_cuda_build.py --archs $ARCH && $PY -m fastdd info"
  step tests 150 1 "$PY -m pytest -q -p no:cacheprovider -rs $GPU_TESTS 2>&1 | tee $R/gpu_tests.txt; rc=\${PIPESTATUS[0]}; if grep -q '^SKIPPED' $R/gpu_tests.txt; then echo 'a GPU test was skipped: the step fails'; exit 1; fi; exit \$rc"
  step bench_ops 150 1 "$PY benchmarks/bench_ops.py --device cuda --out $R"
  step bench_igd 240 1 "$PY -m fastdd bench --config dit-xl2-256 --device cuda --methods igd --repeats 1 --out $R"
  step bench_more 240 0 "$PY -m fastdd bench --config dit-xl2-256 --device cuda --methods dap,mgd3,igds,sam,d3hr --repeats 1 --no-compile --out $R"
fi

echo "== $MODE: $( ((FAILED)) && echo 'a required step FAILED' || echo 'every required step passed') in ${SECONDS} s; $OUT/summary.md, $OUT/results.tar.gz"
exit "$FAILED"

#!/usr/bin/env bash
# One device-machine call: build the extension with CUDA, run the GPU tests, run the GPU benchmarks.
# Usage (on the GPU machine, repo root): bash scripts/gpu_session.sh STAGE...   stages: build tests
#   defaulttests bench_int4 bench_prefix bench_gate bench_iapt bench_e2e
# Logs and benchmark rows go to $OUT (or out/gpu) as gpu.tgz; the built extension as a copy too.
set -u
OUT=${OUT:-out/gpu}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
stage() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) $(date +%T)";
  local t0=$SECONDS; timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc $((SECONDS - t0))s"; tail -n ${TAILN:-15} "$OUT/logs/$name.log"; }
for s in "$@"; do case $s in
  build)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"
    if ls .gpu_so/_C*.so >/dev/null 2>&1; then cp .gpu_so/_C*.so mops_kernels/ && echo "carried extension"
    else MAX_JOBS=16 stage build 400 python3 -m pip install --no-deps --no-build-isolation -e .
      cp mops_kernels/_C*.so "$OUT/"; fi
    python3 -c "import mops_kernels as m; from mops_kernels import _backend as b; print(m.backend_info(), 'ext cuda:', b.extension_has_cuda())" ;;
  tests) stage tests 300 python3 -m pytest -q -rs -x -p no:cacheprovider tests/test_int4_matmul.py tests/test_prefix_attention.py -k cuda ;;
  defaulttests) MOPS_TEST_DEVICE=cuda stage defaulttests 420 python3 -m pytest -q -rfs -n 8 -p no:cacheprovider \
      tests/test_int4_matmul.py tests/test_prefix_attention.py tests/test_gate_topk.py tests/test_rational_iapt.py tests/test_reference.py ;;
  bench_int4) stage bench_int4 240 python3 benchmarks/bench_int4_matmul.py ;;
  bench_prefix) stage bench_prefix 240 python3 benchmarks/bench_prefix_attention.py ;;
  bench_gate) stage bench_gate 120 python3 benchmarks/bench_gate_topk.py --backward ;;
  bench_iapt) stage bench_iapt 120 python3 benchmarks/bench_iapt.py ;;
  bench_e2e) stage bench_e2e 400 python3 benchmarks/bench_e2e.py --device cuda ;;
  *) echo "unknown stage $s"; exit 2 ;;
esac; done
cp -r benchmarks/results "$OUT/logs/results"
tar czf "$OUT/gpu.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"   # at most 8 files come back: one archive

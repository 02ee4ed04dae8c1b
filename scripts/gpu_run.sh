#!/usr/bin/env bash
# The whole GPU session in one command of <= 540 s, on the device machine's image as it is (torch
# 2.11 cu130, triton 3.6, transformers 5.17, Python 3.12, no internet).
#
#   bash scripts/gpu_run.sh                 # on the GPU machine, repo root; results in $OUT (or out/gpu)
#   bash scripts/gpu_run.sh --dry-run       # the same plumbing on a CPU machine (tests/test_gpu_scripts.py)
#   bash scripts/gpu_run.sh spec6 e2e       # some stages only (env always runs; build if a test stage needs it)
#
# Stages, each with its own deadline, all inside BUDGET_S (default 540 s):
#   env           nvidia-smi, nvcc and every package version; a wheel carried in .whl/ (gitignored, sent
#                 with run's `carry`) is installed to /tmp/site only when the image lacks its module
#                 (the image has peft; it has no gguf, which test_backbone's GPU test needs: before the
#                 call, `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
#                 -d .whl gguf==0.19.0` (pure Python; its needs numpy, pyyaml, requests, tqdm are on
#                 the image) and run with carry [".whl"])
#   build         the CUDA extension, in the background from the start: pip install --no-deps
#                 --no-build-isolation -e . with TORCH_CUDA_ARCH_LIST=9.0 (sm_90 only); its errors are
#                 printed; a failed build fails tests_cuda only (spec6 then times the Triton kernels)
#   tests_triton  pytest -m gpu -k triton: only the tests that place tensors on the GPU (conftest
#                 marks every requires_cuda test `gpu`), the Triton cases, while the extension builds
#   tests_cuda    pytest -m gpu -k "not triton", after the build: the CUDA-kernel cases and the tests
#                 through the dispatcher (which prefers the CUDA kernels once they are built)
#   spec6         benchmarks/spec6.py: every SPEC §6 figure and its closing table
#   e2e           benchmarks/bench_e2e.py --batches 32,8,1: B=32 first, each batch size on its own
#   dln           (after tests_triton, while the extension builds) benchmarks/bench_dln_scoring.py --device cuda --shape .gpu_shape: shared-prefix vs
#                 concatenated DLN scoring on SmolLM2's shape with random weights (the GGUF does not travel;
#                 before the call, `python3 benchmarks/bench_dln_scoring.py --export-shape .gpu_shape`, a
#                 few MB, gitignored, and carry [".whl", ".gpu_shape"]); skipped without it
#   sweeps        benchmarks/sweep_int4_tc.py: the CUDA GEMV's K split (--gemv, M = 1..4) on 4096x4096 and
#                 4096x11008, and the Triton tensor-core launches on 4096x11008 (rows for the next choices)
# After EVERY stage the logs, the benchmark rows and summary.txt are packed into $OUT/gpu.tgz (and
# $OUT/summary.txt beside it), so a stage that times out loses nothing before it; the built extension
# goes to $OUT as well (carry it back as .gpu_so/ to skip the build on a later call).
# LIMIT_<stage>=S overrides one stage's deadline. Exit status: 0 when every stage that ran passed.
set -u
cd "$(dirname "$0")/.."
export DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ALL="env build tests_triton tests_cuda spec6 e2e sweeps dln"
STAGES=${*:-$ALL}
want() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
BUDGET=${BUDGET_S:-540}
T0=$SECONDS
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/results"
SUMMARY=$WORK/summary.txt
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ $DRY = 1 ]; then export MOPS_BENCH_RESULTS=$WORK/results; fi   # keep the repo's rows clean
FAILED=0

left() { echo $((BUDGET - (SECONDS - T0))); }
note() { echo "$*" | tee -a "$SUMMARY"; }
pack() {   # everything so far into $OUT: at most a few files come back from the machine
  if [ $DRY = 0 ] && [ -d benchmarks/results ]; then cp -r benchmarks/results/. "$WORK/results/"; fi
  tar czf "$OUT/gpu.tgz.tmp" -C "$WORK" logs results summary.txt 2>/dev/null && mv "$OUT/gpu.tgz.tmp" "$OUT/gpu.tgz"
  cp "$SUMMARY" "$OUT/summary.txt"
}
# stage NAME LIMIT CMD...: run CMD under min(LIMIT, what is left - 10 s), log it, record, pack.
stage() {
  local name=$1 limit=$2; shift 2
  local override="LIMIT_$name"
  limit=${!override:-$limit}              # LIMIT_<stage>=S overrides a stage's deadline
  local l; l=$(( $(left) - 10 ))
  if [ "$l" -lt 5 ]; then note "=== $name SKIPPED: no time left"; FAILED=1; pack; return 1; fi
  if [ "$limit" -gt "$l" ]; then limit=$l; fi
  echo "=== $name (limit ${limit}s, t=$((SECONDS - T0))s) $(date -u +%T)"
  local t=$SECONDS
  if declare -F "$1" >/dev/null; then    # a shell function: run it in a child bash under the deadline
    timeout -k 5 "$limit" bash -c "$(declare -f "$1"); $*" > "$LOGS/$name.log" 2>&1
  else
    timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  fi
  local rc=$?
  tail -n "${TAILN:-25}" "$LOGS/$name.log"
  note "=== $name rc=$rc $((SECONDS - t))s$([ $rc = 124 ] && echo " (TIMED OUT at ${limit}s)")"
  [ $rc = 0 ] || FAILED=1
  pack
  return $rc
}

note "gpu_run $([ $DRY = 1 ] && echo '--dry-run ')stages: $STAGES; budget ${BUDGET}s; $(date -u)"

# ---- env: the machine, every version, carried wheels ----------------------------------------------
env_stage() {
  if [ $DRY = 1 ]; then echo "dry run: no GPU ($(uname -m), $(nproc) CPUs)"
  else nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || return 1
       nvcc --version | tail -n 2; fi
  python3 - <<'PY'
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for m, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                ("accelerate", "accelerate"), ("safetensors", "safetensors"), ("gguf", "gguf"),
                ("numpy", "numpy"), ("tokenizers", "tokenizers"), ("pytest", "pytest"),
                ("xdist", "pytest-xdist"), ("mops_kernels", "mops_kernels")):
    try:
        mod = importlib.import_module(m)
        try:
            ver = md.version(dist)
        except md.PackageNotFoundError:
            ver = getattr(mod, "__version__", "?")
        print(f"{m:14s} {ver:12s} {getattr(mod, '__file__', '')}")
    except Exception as e:
        print(f"{m:14s} MISSING ({type(e).__name__}: {e})")
import torch
print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"cc {p.major}.{p.minor}", p.multi_processor_count, "SMs",
          f"L2 {p.L2_cache_size / 2**20:.0f} MiB", f"{p.total_memory / 2**30:.0f} GiB")
PY
}
WHEELS=()
if ls .whl/*.whl >/dev/null 2>&1; then
  for w in .whl/*.whl; do
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if python3 -c "import $mod" 2>/dev/null; then note "carried $(basename "$w"): the image's $mod is kept"
    else WHEELS+=("$w"); fi
  done
fi
if [ ${#WHEELS[@]} -gt 0 ]; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${WHEELS[@]}"; then
    export PYTHONPATH=$PYTHONPATH:/tmp/site; note "installed carried wheels: ${WHEELS[*]}"
  else note "installing the carried wheels failed: ${WHEELS[*]}"; FAILED=1; fi
else note "no carried wheel needed (.whl/: $(ls .whl 2>/dev/null | tr '\n' ' '))"; fi
stage env 60 env_stage

# ---- build: the CUDA extension in the background -----------------------------------------------------
BUILD_PID=""
BUILD_LIMIT=330
if want build || want tests_cuda; then
  if ls .gpu_so/_C*.so >/dev/null 2>&1 && [ $DRY = 0 ]; then
    cp .gpu_so/_C*.so mops_kernels/ && echo 0 > "$WORK/build.rc" && note "build: carried extension .gpu_so/ used"
  else
    if [ $DRY = 1 ]; then BUILD_CMD=(python3 setup.py --version)      # the plumbing: setup.py parses, no compile
    else SYSCC=(); [ -x /usr/bin/g++ ] && SYSCC=(CXX=/usr/bin/g++ CC=/usr/bin/gcc)   # see below
         # the image's default c++ (/opt/gcc/bin/g++, a wrapper) links its own C++ runtime into the
         # extension: every TORCH_CHECK then crashes the process (scripts/gpu_probe_exceptions.sh,
         # 2026-11-26); setup.py's error-path probe refuses such a build
         BUILD_CMD=(env "${SYSCC[@]}" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 MOPS_REQUIRE_EXTENSION=1
                    python3 setup.py build_ext --inplace); fi   # not pip -e: setuptools' develop re-runs pip with build isolation (no internet there)
    echo "=== build started in the background (limit ${BUILD_LIMIT}s): ${BUILD_CMD[*]}"
    ( timeout -k 5 $BUILD_LIMIT "${BUILD_CMD[@]}" > "$LOGS/build.log" 2>&1; echo $? > "$WORK/build.rc" ) &
    BUILD_PID=$!
  fi
fi
wait_build() {   # -> 0 when the extension built (with its CUDA kernels on a GPU)
  [ -f "$WORK/build.rc" ] || [ -n "$BUILD_PID" ] || { note "=== build not run"; return 1; }
  [ -n "$BUILD_PID" ] && wait "$BUILD_PID"
  BUILD_PID=""
  local rc; rc=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
  if [ -f "$LOGS/build.log" ]; then
    grep -iE "error|warning: mops_kernels" "$LOGS/build.log" | head -n 40
    tail -n 5 "$LOGS/build.log"
  fi
  if [ "$rc" = 0 ] && [ $DRY = 0 ]; then
    python3 -c "from mops_kernels import _backend as b; import sys; print('extension with CUDA:', b.extension_has_cuda()); sys.exit(0 if b.extension_has_cuda() else 1)" || rc=1
    cp mops_kernels/_C*.so "$OUT/" 2>/dev/null
  fi
  note "=== build rc=$rc (t=$((SECONDS - T0))s)"
  pack
  return "$rc"
}

# ---- tests: only those that put tensors on the GPU ---------------------------------------------------
TEST_FILES=$(grep -l "requires_cuda" tests/test_*.py | tr '\n' ' ')
PYTEST=(python3 -m pytest -q -rfEs -p no:cacheprovider -m gpu)
if [ $DRY = 0 ] && python3 -c "import xdist" 2>/dev/null; then PYTEST+=(-n 4); fi
if want tests_triton; then stage tests_triton 150 "${PYTEST[@]}" -k triton $TEST_FILES; fi
# dln runs while the extension builds: DLN scoring is prefill, on the Triton kernels alone
dln_stage() {
  if [ "$DRY" = 1 ]; then python3 benchmarks/bench_dln_scoring.py --help > /dev/null && echo "dry run: dln parses"; return; fi
  python3 benchmarks/bench_dln_scoring.py --device cuda --shape .gpu_shape --reps 3   # the default 10 reps took > 110 s on an H200 (eager, ~0.7-3.3 s a call)
}
if want dln; then
  if [ -f .gpu_shape/backbone_config.json ] || [ "$DRY" = 1 ]; then stage dln 150 dln_stage
  else note "=== dln SKIPPED: no .gpu_shape/ (bench_dln_scoring.py --export-shape .gpu_shape, carried)"; fi
fi

BUILD_OK=1
if want build || want tests_cuda; then wait_build || BUILD_OK=0; [ $BUILD_OK = 1 ] || FAILED=1; fi
if want tests_cuda; then
  if [ $BUILD_OK = 1 ]; then stage tests_cuda 90 "${PYTEST[@]}" -k "not triton" $TEST_FILES
  else note "=== tests_cuda NOT RUN: the CUDA extension did not build (see logs/build.log)"; FAILED=1; pack; fi
fi

# ---- benchmarks ---------------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  SPEC6=(python3 benchmarks/spec6.py --dry-run --results "$WORK/results")
  E2E=(python3 benchmarks/bench_e2e.py --device cpu --model tiny --quick --batches 4,2)
else
  SPEC6=(python3 benchmarks/spec6.py --device cuda)
  E2E=(python3 benchmarks/bench_e2e.py --device cuda --batches "${E2E_BATCHES:-32,8,1}")
fi
if want spec6; then TAILN=80 stage spec6 240 "${SPEC6[@]}"; fi
if want e2e; then stage e2e 240 "${E2E[@]}"; fi
sweeps_stage() {
  if [ "$DRY" = 1 ]; then python3 benchmarks/sweep_int4_tc.py --help > /dev/null && echo "dry run: sweeps parse"; return; fi
  python3 benchmarks/sweep_int4_tc.py --gemv --ms 1,4 || return 1
  python3 benchmarks/sweep_int4_tc.py --gemv --ms 1 --shape 4096x11008 || return 1
  python3 benchmarks/sweep_int4_tc.py --shape 4096x11008 --ms 1,16
}
if want sweeps; then TAILN=40 stage sweeps 180 sweeps_stage; fi
note "gpu_run done in $((SECONDS - T0))s: $([ $FAILED = 0 ] && echo 'every stage passed' || echo 'SOME STAGE FAILED')"
pack
rm -rf "$WORK"
exit $FAILED

#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc (compile only: no GPU on CI machines), for sm_90 and sm_80,
# with the flags setup.py builds them with (--use_fast_math).
# CUDA code that does not compile fails CI. Glue files use c10/cuda headers (no cuBLAS needed).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then echo "check_cuda_compile: nvcc not found" >&2; exit 1; fi
inc=$(python3 -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
abi=$(python3 -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
compile_one() {
  "$NVCC" -c "$1" -o "$out/$(basename "$1").o" -std=c++17 -O3 -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C \
    -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=sm_80 --expt-relaxed-constexpr --use_fast_math -Icsrc $inc -I"$pyinc" \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" && echo "ok   $1" || { echo "FAIL $1" >&2; return 1; }
}
# Two at a time (the machines have 2 cores); every failure is reported, any failure fails.
pids=(); files=(); fail=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  echo "nvcc -c $f"
  compile_one "$f" & pids+=($!); files+=("$f")
  if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[0]}" || fail=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
# The CUDA glue (*_cuda_glue.cpp: checks, allocation, launch through cuda_launch.h) is g++ code that only
# a CUDA build compiles (WITH_CUDA): compile it here too, against the CUDA toolkit's headers.
cudainc=""
for c in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")"; do
  if [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ]; then cudainc=$c/include; break; fi
done
[ -n "$cudainc" ] || { echo "check_cuda_compile: no CUDA include directory (cuda_runtime.h); set CUDA_HOME" >&2; exit 1; }
for f in csrc/*_cuda_glue.cpp; do
  [ -e "$f" ] || continue
  echo "g++ -c $f (WITH_CUDA)"
  ${CXX:-g++} -c "$f" -o "$out/$(basename "$f").o" -std=c++17 -O1 -fPIC -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C \
    -Icsrc $inc -I"$cudainc" -I"$pyinc" -D_GLIBCXX_USE_CXX11_ABI="$abi" && echo "ok   $f" || { echo "FAIL $f" >&2; fail=1; }
  files+=("$f")
done
[ "$fail" -eq 0 ] || { echo "check_cuda_compile: a CUDA file failed to compile" >&2; exit 1; }
echo "check_cuda_compile: ${#files[@]} CUDA file(s) (kernels and glue) compiled"

#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc (compile only: no GPU on CI machines), for sm_90.
# CUDA code that does not compile fails CI. Glue files use c10/cuda headers (no cuBLAS needed).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then echo "check_cuda_compile: nvcc not found" >&2; exit 1; fi
inc=$(python3 -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
n=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  echo "nvcc -c $f"
  "$NVCC" -c "$f" -o "$out/$(basename "$f").o" -std=c++17 -O3 -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C \
    -gencode=arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Icsrc $inc -I"$pyinc" \
    -D_GLIBCXX_USE_CXX11_ABI=$(python3 -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
  n=$((n+1))
done
echo "check_cuda_compile: $n CUDA file(s) compiled"

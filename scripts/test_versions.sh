#!/usr/bin/env bash
# Run the test suite in a throwaway venv with other versions of slmkit's dependencies: how the ranges
# pyproject.toml declares were checked (README, "Requirements").
#
#   bash scripts/test_versions.sh --python python3.12 torch==2.11.0 transformers==5.17.0 triton==3.6.0 'numpy<2.4'
#   bash scripts/test_versions.sh torch==2.6.0 'numpy<2.4' -- -m 'not e2e'
#   bash scripts/test_versions.sh --venv /tmp/t26 torch==2.6.0 'numpy<2.4'   # keeps the venv for a rerun
#
# Arguments: pip requirements (the pins to test), then optionally `--` and pytest's arguments.
# Options: --python PY (the interpreter, default python3); --venv DIR (the venv to create or reuse and keep;
# default a temporary one, removed afterwards). A torch other than the machine's local 2.13.0 CPU wheel
# comes from PyPI as a CUDA build (gigabytes). Triton before 3.7 interprets kernels only with NumPy < 2.4:
# add 'numpy<2.4' with such a triton (the tests stop with that advice otherwise).
set -euo pipefail
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
PY=python3
VENV=""
SPECS=()
PYTEST_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python) [[ $# -ge 2 ]] || { echo "error: --python needs an interpreter" >&2; exit 2; }; PY="$2"; shift 2 ;;
        --venv) [[ $# -ge 2 ]] || { echo "error: --venv needs a directory" >&2; exit 2; }; VENV="$2"; shift 2 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -*) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) SPECS+=("$1"); shift ;;
    esac
done
[[ ${#SPECS[@]} -gt 0 ]] || { echo "error: name the versions to test, e.g. torch==2.11.0 (see --help)" >&2; exit 2; }
command -v "$PY" > /dev/null || { echo "error: no Python interpreter '$PY'" >&2; exit 2; }
if [[ -n "$VENV" && -e "$VENV" && ! -x "$VENV/bin/python" ]]; then
    echo "error: $VENV exists and is not a venv; name a new directory or an existing venv" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "$VENV" ]]; then
    VENV="$(mktemp -d)/venv"
    trap 'rm -rf "$(dirname "$VENV")"' EXIT
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "${SPECS[@]}"
pip_install -e ".[dev]" "${SPECS[@]}"  # the pins again, so the resolver keeps them
"$VENV/bin/python" - <<'EOF'
import platform
from importlib.metadata import PackageNotFoundError, version


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"


names = ["torch", "transformers", "triton", "accelerate", "numpy", "compressed-tensors"]
print("testing with python " + platform.python_version() + ", "
      + ", ".join(f"{name} {installed(name)}" for name in names), flush=True)
EOF
export TRITON_INTERPRET=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"

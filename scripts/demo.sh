#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct): set up, show the model, then
# train a prefix on the bundled demo task (about a minute on 2 CPU cores once set up), showing outputs before
# and after, and save the artifact and the loss plot under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
SP=.venv/bin/softprompt
$SP info
$SP demo --out out/demo

#!/usr/bin/env bash
# Set up and run the whole test suite offline (tiny random models, the PEFT oracle, and one test on
# the real embedded model, marked `embedded`: select it with -m embedded, skip it with -m "not embedded").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser.sh  # Chromium for the web test, where this machine can install it
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"

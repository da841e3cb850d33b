#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct): set up, show the model, make a
# prompt-tuning artifact initialized from text, and generate with it next to the bare model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
SP=.venv/bin/softprompt
$SP info
$SP init out/demo-prompt --method prompt_tuning --text "Answer in one short, plain sentence."
$SP init out/demo-prefix --method prefix_tuning --projection-dim 0 --text "Answer in one short, plain sentence."
for q in "The capital of France is" "Water boils at"; do
  echo "--- prompt: $q"
  echo "bare model:      $($SP generate "$q" --max-new-tokens 24 2>/dev/null | tr '\n' ' ')"
  echo "prompt tuning:   $($SP generate "$q" --adapter out/demo-prompt --max-new-tokens 24 2>/dev/null | tr '\n' ' ')"
  echo "prefix tuning:   $($SP generate "$q" --adapter out/demo-prefix --max-new-tokens 24 2>/dev/null | tr '\n' ' ')"
done

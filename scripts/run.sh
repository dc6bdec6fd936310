#!/usr/bin/env bash
# Set up (idempotent) and run edgelm on the default model, SmolLM2-135M-Instruct:
#   bash scripts/run.sh ["prompt"] [edgelm run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL="${EDGELM_MODELS_DIR:-$HOME/.cache/edgelm/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT="${1:-<|im_start|>user
Write a haiku about a Raspberry Pi.<|im_end|>
<|im_start|>assistant
}"
shift || true
exec .venv/bin/edgelm run "$MODEL" "$PROMPT" --special -n 128 -v "$@"

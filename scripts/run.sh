#!/usr/bin/env bash
# Set up (idempotent) and run the daemon on the default model, SmolLM2-135M-Instruct,
# at http://127.0.0.1:8080 (OpenAI-compatible API). Extra arguments go to
# `edgelm serve` (e.g. --host 0.0.0.0 --port 8081, --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgelm serve "$@"

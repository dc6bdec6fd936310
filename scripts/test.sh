#!/usr/bin/env bash
# The whole test suite, set-up included: Rust core tests (incl. goldens against
# llama.cpp fixtures, corrupt-file table, fuzz), then pytest on the real models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # the Rust tests call python3 with gguf installed
echo "== cargo test (edgelm-core)" >&2
cargo test -p edgelm-core
echo "== mypy.stubtest + mypy" >&2
.venv/bin/python -m mypy.stubtest edgelm._native
.venv/bin/python -m mypy edgelm
echo "== pytest" >&2
.venv/bin/python -m pytest tests/python -q

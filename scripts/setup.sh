#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with the Python
# dependencies, the edgelm wheel built from this checkout (Rust, release profile),
# and the real models. Needs: cargo (rustup), python3 >= 3.11 with venv/pip.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup.rs" >&2; exit 1; }
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "setup: $PY is older than 3.11" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
echo "setup: building edgelm (cargo, release) ..." >&2
VIRTUAL_ENV="$PWD/.venv" .venv/bin/maturin develop --release -q
.venv/bin/python scripts/fetch_models.py

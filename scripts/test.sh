#!/usr/bin/env bash
# The whole test suite, set-up included: Rust core tests (incl. goldens against
# llama.cpp fixtures, corrupt-file table, fuzz, kernels at every x86 level), pytest on
# the real models, the goldens again at each lower kernel level, and the NEON kernels
# under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The systemd unit test runs `systemd-analyze verify` (Debian: package systemd).
if ! command -v systemd-analyze >/dev/null; then
  echo "== installing systemd (for systemd-analyze)" >&2
  apt-get install -y -q systemd >/dev/null
fi
export PATH="$PWD/.venv/bin:$PATH"   # the Rust tests call python3 with gguf installed
echo "== rustfmt (rustfmt.toml)" >&2
cargo fmt --all -- --check
echo "== ruff format + ruff check (pyproject.toml [tool.ruff])" >&2
.venv/bin/ruff format --check edgelm tests benches scripts
.venv/bin/ruff check edgelm tests benches scripts
echo "== cargo clippy (warnings are errors)" >&2
cargo clippy -q -p edgelm-core -p edgelm-py -- -D warnings
echo "== cargo test (edgelm-core; CUDA kernels compiled by NVRTC for sm_87 and sm_90)" >&2
# NVRTC from the nvidia-cuda-nvrtc wheel: the CUDA kernels must compile in CI even
# though this machine has no GPU (the GPU tests in tests/cuda.rs skip themselves).
EDGELM_NVRTC="$(.venv/bin/python -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(nvidia.cuda_nvrtc.__path__[0], "lib", "libnvrtc.so.12"))')"
export EDGELM_NVRTC EDGELM_REQUIRE_NVRTC=1
cargo test -p edgelm-core
echo "== mypy.stubtest + mypy" >&2
.venv/bin/python -m mypy.stubtest edgelm._native
.venv/bin/python -m mypy edgelm
# The scheduler's fake executor is held to the same Executor Protocol as the real one.
.venv/bin/python -m mypy --strict tests/python/test_scheduler.py
echo "== pytest (kernel level: $(.venv/bin/python -c 'import edgelm._native as n; print(n.kernel_level())'))" >&2
.venv/bin/python -m pytest tests/python -q
# The end-to-end goldens (greedy vs llama.cpp, perplexity) again at every lower
# kernel level this CPU can run.
for level in $(.venv/bin/python -c 'import edgelm._native as n; print(" ".join(n.available_kernel_levels()[:-1]))'); do
  echo "== pytest goldens at EDGELM_KERNEL_LEVEL=$level" >&2
  EDGELM_KERNEL_LEVEL=$level .venv/bin/python -m pytest tests/python/test_golden.py tests/python/test_tiny_archs.py -q
done
echo "== ARM NEON kernels under qemu (cortex-a72, cortex-a76, max)" >&2
bash scripts/test_arm.sh

#!/usr/bin/env bash
# ARM kernel tests under qemu-user: cross-builds edgelm-core's `quant`, tiled-attention
# (`model::attn`) and mixture-of-experts (`model::moe`: routing, grouped matmul) unit tests for
# aarch64 with Debian's rustc and runs them on three emulated CPUs, one per NEON level:
#   cortex-a72 → neon            cortex-a76 → neon + dotprod            max → + i8mm
# Each run prints the levels it exercised ("kernel levels tested: ..."); the script fails
# if a test fails or a CPU's top level was not among them.
#
# Set-up (Debian bookworm, as root; skipped when already installed): the arm64 foreign
# architecture, rustc-web (its std for aarch64), the cross gcc/libc, qemu-user-static.
#
# Trap: qemu-user 7.2 deadlocks at the first pthread_create of a *dynamically* linked
# aarch64 binary on this kernel (C and Rust alike), and the test harness spawns threads;
# so the tests are linked statically (+crt-static), which runs fine.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static)
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "test_arm.sh: missing packages ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "== installing ${missing[*]}" >&2
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR=target/aarch64
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
CARGO_ARGS=(-p edgelm-core --target aarch64-unknown-linux-gnu --lib)

echo "== building aarch64 kernel tests with $($RUSTC --version)" >&2
cargo test "${CARGO_ARGS[@]}" --no-run

status=0
for cpu_level in cortex-a72:neon cortex-a76:dotprod max:i8mm; do
    cpu=${cpu_level%%:*} want=${cpu_level##*:}
    echo "== QEMU_CPU=$cpu" >&2
    log=$(mktemp)
    if QEMU_CPU=$cpu cargo test "${CARGO_ARGS[@]}" -- quant model::attn model::moe --nocapture >"$log" 2>&1; then
        ok=1
    else
        ok=0
    fi
    levels=$(grep -m1 '^kernel levels tested:' "$log" || echo "kernel levels tested: (none)")
    grep -E '^test result:' "$log" | tail -1 || true
    echo "QEMU_CPU=$cpu: $levels"
    if [[ $ok -ne 1 ]]; then
        grep -E 'panicked|FAILED|^error' -A3 "$log" | head -40 >&2
        echo "test_arm.sh: kernel tests FAILED under QEMU_CPU=$cpu" >&2
        status=1
    elif ! grep -qw "$want" <<<"${levels#*:}"; then
        echo "test_arm.sh: QEMU_CPU=$cpu should exercise the $want level" >&2
        status=1
    fi
    rm -f "$log"
done
exit $status

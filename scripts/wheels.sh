#!/usr/bin/env bash
# The wheels users install: x86_64 and aarch64, abi3 from Python 3.10, manylinux_2_28
# (Debian 11 / Ubuntu 20.04 and later, JetPack 5 and 6, Raspberry Pi OS Bookworm), each
# with every CPU kernel level chosen at run time and the CUDA backend loaded at run time
# (NVRTC and the driver are opened with dlopen, so nothing CUDA is linked).
#
#   bash scripts/wheels.sh [OUT_DIR]        # default target/wheels
#
# Built here by maturin with zig from PyPI (`ziglang`) as the linker, which links against
# glibc 2.28's symbol versions whatever this machine's glibc is; aarch64 with Debian's
# rustc (its std for aarch64, as scripts/test_arm.sh installs it). auditwheel then checks
# each wheel's platform tag against the symbols it really needs. Then, as a new user
# would: the x86_64 wheel into a fresh venv of the oldest Python it supports (3.10 when
# pyenv has it), from PyPI for its dependencies, with no Rust on the PATH, serving one
# request from the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/wheels}
rm -rf "$OUT" && mkdir -p "$OUT"
export PATH="$PWD/.venv/bin:$PATH"   # maturin finds `python -m ziglang` here

echo "== wheel x86_64 (manylinux_2_28, abi3 ≥ 3.10)" >&2
maturin build --release --zig --compatibility manylinux_2_28 -o "$OUT" 2>&1 | grep -E "Built wheel|error|warning: unused" >&2
echo "== wheel aarch64" >&2
if [ -x /usr/bin/rustc ] && /usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu >/dev/null 2>&1 \
  && [ -d "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu)" ]; then
  RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/aarch64-wheel \
    maturin build --release --zig --target aarch64-unknown-linux-gnu --compatibility manylinux_2_28 -o "$OUT" 2>&1 \
    | grep -E "Built wheel|error" >&2
else
  echo "no aarch64 std for /usr/bin/rustc: run scripts/test_arm.sh once (it installs Debian's rustc-web)" >&2
  exit 1
fi

for arch in x86_64 aarch64; do
  whl=$(ls "$OUT"/edgelm-*-cp310-abi3-manylinux_2_28_"$arch".whl)
  auditwheel show "$whl" >"$OUT/auditwheel-$arch.txt" 2>&1 || { cat "$OUT/auditwheel-$arch.txt" >&2; exit 1; }
  tag=$(tr '\n' ' ' <"$OUT/auditwheel-$arch.txt" | grep -oE "platform tag: \"manylinux_2_[0-9]+_$arch" | grep -oE "manylinux.*")
  minor=${tag#manylinux_2_}; minor=${minor%%_*}
  echo "$(basename "$whl"): auditwheel: consistent with $tag" >&2
  [ -n "$tag" ] && [ "$minor" -le 28 ] || { echo "$whl needs a newer glibc than 2.28 ($tag)" >&2; exit 1; }
  python3 - "$whl" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["edgelm/_native.abi3.so", "edgelm/systemd/edgelm.service", "edgelm/systemd/edgelm.yaml", "edgelm/catalogue.json"]
missing = [n for n in need if n not in names]
lic = [n for n in names if n.endswith("/LICENSE") or "/licenses/" in n]
assert not missing and lic, (missing, lic)
EOF
done

echo "== fresh venv, the x86_64 wheel, no Rust on PATH: edgelm serve answers" >&2
PY=$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python3.10 2>/dev/null | head -1 || true)
if [ -z "$PY" ] && python3.10 -c "" 2>/dev/null; then PY=python3.10; fi
PY=${PY:-python3}
echo "Python: $("$PY" --version 2>&1)" >&2
"$PY" -m venv "$OUT/venv"
"$OUT/venv/bin/pip" install -q "$(ls "$OUT"/edgelm-*_x86_64.whl)"
MODEL=${EDGELM_MODELS_DIR:-$HOME/.cache/edgelm/models}/SmolLM2-135M-Instruct.Q4_1.gguf
PORT=$("$OUT/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$OUT" && exec env -i HOME="$HOME" PATH=/usr/bin:/bin "$PWD/venv/bin/edgelm" serve --model "$MODEL" \
  --port "$PORT" --threads 2 --no-mdns >"serve.log" 2>&1) &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
"$OUT/venv/bin/python" - "$PORT" <<'EOF'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
req = urllib.request.Request(url + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                             data=json.dumps({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode())
with urllib.request.urlopen(req, timeout=120) as r:
    body = json.load(r)
text = body["choices"][0]["text"]
assert body["usage"]["completion_tokens"] > 0 and text.strip(), body
print(f"served by the wheel ({sys.version.split()[0]}): {text!r}")
EOF

#!/usr/bin/env bash
# The new architectures on the GPU: edgelm's CUDA backend beside llama.cpp b11434 built
# with CUDA, on the same synthetic files of real shapes (benches/synthetic.py: Qwen3-1.7B,
# Qwen3-30B-A3B with 8 of its 48 layers), Q4_K_M, in one session on the GPU machine.
#
#   bash benches/cuda_archs.sh LLAMA_SDIST.tar.gz OUT_DIR [qwen3-1.7b qwen3-30b-a3b-8l]
#
# Needs .gpu/ from scripts/gpu_build.sh (cuda_bench, the wheel's _native, gguf-py). Steps
# (STEPS, default all, in this order):
#   files        write each shape's F16 file (gguf-py) and quantize it to Q4_K_M with
#                edgelm's quantizer (llama-quantize's bytes), into $MEASURE_DIR;
#   build        llama.cpp from the sdist with -DGGML_CUDA=ON (llama-bench), in
#                $LLAMA_BUILD (reused if built; shared with cuda_side_by_side.sh);
#   edgelm       `cuda_bench FILE`: pp512, tg128, 16 and 64 streams;
#   llama-bench  `llama-bench -p 512 -n 128 -fa 1 -ngl 99 -r 3` on the same files.
# One command may run 10 minutes: run the steps in several calls with LLAMA_BUILD and
# MEASURE_DIR under /tmp (kept while the machine is held).
set -uo pipefail
SDIST=$1 OUT=$2
shift 2
MODELS=${*:-qwen3-1.7b qwen3-30b-a3b-8l}
STEPS=${STEPS:-files build edgelm llama-bench}
LLAMA_BUILD=${LLAMA_BUILD:-/tmp/llama-cuda}
MEASURE_DIR=${MEASURE_DIR:-/tmp/archs}
mkdir -p "$OUT" "$MEASURE_DIR" "$LLAMA_BUILD"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/archs.log" >&2; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
export PYTHONPATH=$PWD:$PWD/.gpu/py:$PWD/benches
cp -n .gpu/pkg/edgelm/_native.abi3.so edgelm/ 2>/dev/null || true

if has files; then
  for m in $MODELS; do
    [ -f "$MEASURE_DIR/$m.Q4_K_M.gguf" ] && continue
    log "files: $m"
    python3 -c "
import sys
from pathlib import Path
from synthetic import SHAPES, write_f16
from edgelm import _native
f16, q = Path('$MEASURE_DIR/$m.F16.gguf'), Path('$MEASURE_DIR/$m.Q4_K_M.gguf')
write_f16(f16, SHAPES['$m'])
_native.quantize_file(f16, q, 'Q4_K_M', threads=16)
f16.unlink()
print(q, q.stat().st_size)" 2>&1 | tee -a "$OUT/archs.log"
  done
fi

if has build && [ ! -x "$LLAMA_BUILD/build/bin/llama-bench" ]; then
  log "llama.cpp: configure"
  tar xzf "$SDIST" -C "$LLAMA_BUILD"
  SRC=$(dirname "$(find "$LLAMA_BUILD" -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/*' | head -1)")
  cmake -S "$SRC" -B "$LLAMA_BUILD/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$OUT/cmake.log" 2>&1 || { log "cmake failed"; exit 1; }
  log "llama.cpp: build llama-bench"
  cmake --build "$LLAMA_BUILD/build" --target llama-bench -j "$(nproc)" >"$OUT/build.log" 2>&1 \
    || { log "build failed"; tail -30 "$OUT/build.log" >&2; exit 1; }
  log "llama.cpp: built"
fi

if has edgelm; then
  for m in $MODELS; do
    log "edgelm $m"
    ./.gpu/cuda_bench "$MEASURE_DIR/$m.Q4_K_M.gguf" >>"$OUT/edgelm.jsonl" 2>>"$OUT/edgelm.log"
    grep "tok/s" "$OUT/edgelm.log" | tail -1 | tee -a "$OUT/archs.log"
  done
fi

if has llama-bench; then
  for m in $MODELS; do
    log "llama-bench $m"
    "$LLAMA_BUILD/build/bin/llama-bench" -m "$MEASURE_DIR/$m.Q4_K_M.gguf" -p 512 -n 128 -fa 1 -ngl 99 -r 3 -o json \
      >"$OUT/llama-bench-$m.json" 2>"$OUT/llama-bench-$m.log"
    tail -3 "$OUT/llama-bench-$m.log" >&2
    python3 -c "
import json; rows = json.load(open('$OUT/llama-bench-$m.json'))
print(' '.join(f\"{'pp' if r['n_prompt'] else 'tg'} {r['avg_ts']:.1f} ({min(r['samples_ts']):.1f}-{max(r['samples_ts']):.1f})\" for r in rows))" | tee -a "$OUT/archs.log"
  done
fi
log done

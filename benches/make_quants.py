#!/usr/bin/env python3
"""Make the SmolLM2 copies the CPU benchmark measures, with llama.cpp's quantizer:
Q4_0, Q8_0, Q4_K_M and Q6_K, requantized from the Q4_1 file (--allow-requantize),
into $EDGELM_QUANT_DIR (default ~/.cache/edgelm/quant). Idempotent.

    .venv/bin/python benches/make_quants.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODELS = Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))
OUT = Path(os.environ.get("EDGELM_QUANT_DIR", Path.home() / ".cache/edgelm/quant"))
BIN = Path(os.environ.get("LLAMA_CPP_BIN", Path.home() / ".cache/edgelm/llama-build/bin"))
TYPES = ["Q4_0", "Q8_0", "Q4_K_M", "Q6_K"]
SRC = "SmolLM2-135M-Instruct.Q4_1.gguf"


def path_for(ty: str) -> Path:
    return OUT / f"SmolLM2-135M-Instruct.{ty}.gguf"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for ty in TYPES:
        out = path_for(ty)
        if out.exists():
            continue
        print(f"llama-quantize {SRC} → {out.name}", file=sys.stderr)
        subprocess.run(
            [str(BIN / "llama-quantize"), "--allow-requantize", str(MODELS / SRC), str(out), ty],
            check=True,
            capture_output=True,
        )
    for ty in TYPES:
        print(path_for(ty))
    return 0


if __name__ == "__main__":
    sys.exit(main())

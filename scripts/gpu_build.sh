#!/usr/bin/env bash
# Build what the GPU machine (the device tool: no Rust, no network) runs, into the
# ignored folder .gpu/ of this checkout: the CUDA test binary (.gpu/cuda_test), the
# bench (.gpu/cuda_bench) and the wheel's extension (.gpu/pkg/edgelm/_native.abi3.so,
# abi3: it imports on the GPU machine's Python 3.12). Debug info is stripped so that
# .gpu/ stays under 10 MiB of the 64 MiB a call may carry. See DEVELOPERS.md, CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
exe=$(cargo test -p edgelm-core --test cuda --no-run --message-format=json 2>/dev/null | python3 -c "
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'cuda':
        print(m['executable'])
")
cp "$exe" .gpu/cuda_test
cargo build --release -q -p edgelm-core --example cuda_bench
cp target/release/examples/cuda_bench .gpu/cuda_bench
wheels=$(mktemp -d)
.venv/bin/maturin build --release -q -o "$wheels" >/dev/null
rm -rf .gpu/pkg
.venv/bin/python -c "
import glob, sys, zipfile
z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0])
z.extract('edgelm/_native.abi3.so', '.gpu/pkg')" "$wheels"
rm -rf "$wheels"
strip --strip-debug .gpu/cuda_test .gpu/cuda_bench .gpu/pkg/edgelm/_native.abi3.so
# gguf-py and PyYAML for the benches that write model files there (benches/cuda_archs.sh):
# the GPU machine has no network to pip them; both run as pure Python on its 3.12.
rm -rf .gpu/py && mkdir -p .gpu/py
site=$(.venv/bin/python -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))')
cp -r "$site/gguf" "$site/yaml" .gpu/py/
find .gpu/py -name '__pycache__' -prune -exec rm -rf {} +
find .gpu/py -name '*.so' -delete
du -sh .gpu

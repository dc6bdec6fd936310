"""What limits one-thread generation: the decode matrix kernel on one thread with its
weights in cache (256 KiB, 1 MiB) and in DRAM (512 MiB), beside one thread's DRAM read
bandwidth. The in-cache rate is the kernel's own speed limit; when it is not far above
the DRAM bandwidth, the kernel cannot reach that bandwidth on one thread. Prints and
writes benches/results/gemv_cache.txt.

The work is in the Rust example rust/core/examples/gemv_cache_bench.rs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    r = subprocess.run(
        ["cargo", "run", "-q", "--release", "-p", "edgelm-core", "--example", "gemv_cache_bench"],
        capture_output=True,
        text=True,
    )
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        return 1
    out = f"# {time.strftime('%Y-%m-%d %H:%M:%S')}\n{r.stdout}"
    print(out, end="")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gemv_cache.txt").write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

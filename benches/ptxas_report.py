"""Compile rust/core/src/cuda/kernels.cu with NVRTC (no GPU needed) and print ptxas's
report: registers, shared memory and spills per kernel, for sm_90 and sm_87.

    .venv/bin/python benches/ptxas_report.py [ARCH ...] [--grep NAME]

Uses the libnvrtc.so.12 of the nvidia-cuda-nvrtc-cu12 wheel (requirements-dev.txt), as
the CI compile test does. Kernels that spill are marked with "SPILL".
"""

import ctypes
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nvrtc():
    cands = glob.glob(
        os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1*")
    )
    for c in sorted(cands) + ["libnvrtc.so.13", "libnvrtc.so.12"]:
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    sys.exit("no libnvrtc found: pip install nvidia-cuda-nvrtc-cu12")


def report(lib, src, arch):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", b"-default-device", b"--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, buf.value.decode(errors="replace")


def main():
    args = sys.argv[1:]
    pat = None
    if "--grep" in args:
        i = args.index("--grep")
        pat = args[i + 1]
        del args[i : i + 2]
    arches = [int(a) for a in args] or [90, 87]
    src = open(os.path.join(ROOT, "rust", "core", "src", "cuda", "kernels.cu"), "rb").read()
    lib = nvrtc()
    for arch in arches:
        rc, log = report(lib, src, arch)
        if rc:
            print("\n".join(line for line in log.splitlines() if "error" in line)[:4000])
            sys.exit(f"sm_{arch}: compile failed ({rc})")
        name = "?"
        print(f"== sm_{arch}")
        for line in log.splitlines():
            if "Compiling entry function" in line:
                name = line.split("'")[1]
            elif "Used" in line and (pat is None or pat in name):
                print(f"{name:28s} {line.split('info    :')[-1].strip()}")
            elif "spill" in line and (pat is None or pat in name):
                s = line.split("info    :")[-1].strip()
                if "0 bytes spill stores, 0 bytes spill loads" not in s:
                    print(f"{name:28s} SPILL {s}")


if __name__ == "__main__":
    main()

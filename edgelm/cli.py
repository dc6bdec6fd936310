"""The `edgelm` command.

    edgelm run MODEL "prompt"     stream a continuation to the terminal
    edgelm info MODEL             architecture, sizes, quant types, tokenizer
    edgelm serve [--config F]     the HTTP daemon (OpenAI- and Ollama-compatible API)
    edgelm discover [--json]      edgelm daemons on the LAN (mDNS)
    edgelm pull SOURCE            a GGUF into the models directory (URL, edgelm://, LAN)
    edgelm quantize IN OUT TYPE   re-encode a GGUF's weights (Q4_0 … Q8_0, Q4_K_M, …)
    edgelm convert M.onnx OUT     import a decoder-only ONNX model (float or int4 MatMulNBits)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from edgelm import EdgelmError, __version__


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    from edgelm import Model, _native

    version, file_size, md, tensors = _native.inspect_gguf(args.model)
    print(f"file:          {args.model} ({_fmt_bytes(file_size)}, GGUF v{version})")
    print(f"name:          {md.get('general.name', '?')}")
    arch = md.get("general.architecture", "?")
    ftype = md.get("general.file_type")
    print(f"architecture:  {arch}   file type: {_FTYPE_NAMES.get(ftype, ftype) if ftype is not None else '?'}")
    n_params = sum(_n_elements(dims) for _, dims, _, _ in tensors)
    total = sum(nb for *_, nb in tensors) or 1
    print(f"tensors:       {len(tensors)}, {n_params / 1e6:.1f} M weights, {_fmt_bytes(total)}, "
          f"{8 * total / max(n_params, 1):.2f} bits per weight")
    by_type: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    elems: collections.Counter[str] = collections.Counter()
    for _, dims, ty, nbytes in tensors:
        by_type[ty] += nbytes
        count[ty] += 1
        elems[ty] += _n_elements(dims)
    print("bytes per type:")
    for ty, nbytes in by_type.most_common():
        print(f"  {ty:6s} {count[ty]:5d} tensors  {_fmt_bytes(nbytes):>10s}  {100 * nbytes / total:5.1f}%  "
              f"{8 * nbytes / max(elems[ty], 1):5.2f} bits/weight")
    try:
        m = Model(args.model, n_threads=1)
    except EdgelmError as e:
        print(f"edgelm cannot run it: {e}")
    else:
        nm = m.native
        print(f"layers:        {nm.n_layer}   embedding: {nm.n_embd}   heads: {nm.n_head} (kv {nm.n_head_kv})")
        print(f"context:       {m.n_ctx_train} tokens (trained)")
        print(f"vocabulary:    {m.n_vocab} tokens, tokenizer {nm.tokenizer_model!r} pre {nm.tokenizer_pre!r}, "
              f"bos {nm.bos} eos {nm.eos}")
        print(f"chat template: {'yes' if 'tokenizer.chat_template' in md else 'no'}")
        print(f"weights read per token: {_fmt_bytes(nm.weight_bytes_per_token)}")
        print(f"CPU kernels:   {m.kernel_level} (this CPU can run: {', '.join(_native.available_kernel_levels())}; "
              f"EDGELM_KERNEL_LEVEL lowers it), {_native.physical_cores()} physical cores")
    if not args.summary:
        print("tensors (name, type, shape in ggml order, bytes):")
        for name, dims, ty, nbytes in tensors:
            print(f"  {name:40s} {ty:6s} {'x'.join(map(str, dims)):>14s} {_fmt_bytes(nbytes):>10s}")
    return 0


def _n_elements(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# `general.file_type` values (llama.cpp's enum llama_ftype) edgelm reads or writes.
_FTYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class _ProgressBar:
    """One line redrawn in place on a terminal; a line per tenth of the work otherwise
    (logs, CI), so long jobs always show they are moving."""

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_tenth = -1
        self.last_draw = 0.0

    def __call__(self, i: int, n: int, name: str, src: str, dst: str, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.perf_counter()
        rate = done / max(now - self.t0, 1e-9) / 1e6
        line = f"{self.what} {100 * frac:5.1f}% [{i}/{n}] {name} {src}->{dst} {rate:6.1f} MB/s"
        if self.tty:
            if now - self.last_draw > 0.1 or done == total:
                bar = "#" * int(30 * frac)
                print(f"\r[{bar:30s}] {line[:100]:100s}", end="", file=self.stream, flush=True)
                self.last_draw = now
        else:
            tenth = int(10 * frac)
            if tenth > self.last_tenth:
                self.last_tenth = tenth
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgelm import _native

    if args.dry_run:
        plan = _native.quantize_plan(args.input, args.type, pure=args.pure)
        for name, dims, src, dst, nbytes in plan:
            print(f"  {name:40s} {src:6s} -> {dst:6s} {'x'.join(map(str, dims)):>14s} {_fmt_bytes(nbytes):>10s}")
        print(f"total: {_fmt_bytes(sum(p[4] for p in plan))}")
        return 0
    bar = _ProgressBar("quantizing")
    try:
        s = _native.quantize_file(args.input, args.output, args.type, threads=args.threads, pure=args.pure,
                                  progress=bar)
    finally:
        bar.close()
    in_size = os.path.getsize(args.input)
    print(f"wrote {args.output}: {s['ftype']}, {_fmt_bytes(s['out_file_bytes'])} (from {_fmt_bytes(in_size)}), "
          f"{s['n_tensors']} tensors ({s['n_converted']} re-encoded, {s['n_fallback']} fell back to a 32-block type), "
          f"{s['seconds']:.2f} s, {s['in_tensor_bytes'] / max(s['seconds'], 1e-9) / 1e6:.0f} MB/s of input")
    for ty, n, nbytes in s["by_type"]:
        print(f"  {ty:6s} {n:5d} tensors  {_fmt_bytes(nbytes)}")
    if s["n_requantized"]:
        print(f"note: {s['n_requantized']} tensors were already quantized in {args.input}; re-encoding them adds "
              f"error on top of theirs. Quantize from the F16/BF16/F32 original where you have it.", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from edgelm.convert import convert_onnx

    bar = _ProgressBar("converting")
    try:
        info = convert_onnx(args.model, args.output, tokenizer=args.tokenizer, config=args.config,
                            out_type=args.type, progress=bar)
    finally:
        bar.close()
    print(f"wrote {args.output}: {info['architecture']}, {info['n_layer']} layers, {info['n_tensors']} tensors, "
          f"{_fmt_bytes(info['file_bytes'])}")
    for ty, n in sorted(info["types"].items()):
        print(f"  {ty:6s} {n:5d} tensors")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edgelm import Model

    m = Model(args.model, n_threads=args.threads)
    ids = m.tokenize(args.prompt, add_special=True, parse_special=args.special)
    t0 = time.perf_counter()
    first = None
    n = 0
    for tok in m.generate(
        ids,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    ):
        if first is None:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(tok.text)
        sys.stdout.flush()
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    if args.verbose and first is not None:
        gen_s = t1 - first
        print(f"[{len(ids)} prompt tokens in {first - t0:.2f} s, {n} generated, "
              f"{(n - 1) / gen_s if n > 1 and gen_s > 0 else 0:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edgelm.serve.app import run
    from edgelm.serve.config import ConfigError, load_config

    flags = {k: getattr(args, k) for k in _SERVE_FLAGS}
    if args.no_prefix_cache:
        flags["prefix_cache"] = False
    if args.no_mdns:
        flags["mdns"] = False
    try:
        cfg, path = load_config(args.config, flags)
    except ConfigError as e:
        print(f"edgelm: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(f"# from {path or 'defaults'} + environment + flags (keys redacted)")
        print(yaml.safe_dump(cfg.redacted(), sort_keys=False), end="")
        return 0
    return run(cfg)


def cmd_discover(args: argparse.Namespace) -> int:
    import json

    from edgelm.serve.mdns import discover

    found = discover(args.timeout, args.interfaces or None)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no edgelm daemon answered within {args.timeout:g} s", file=sys.stderr)
        return 1
    rows = [(d["name"], d["url"], d.get("model", ""), d.get("state", ""), d.get("accel", ""), d.get("ver", ""))
            for d in found]
    head = ("NAME", "URL", "MODEL", "STATE", "ACCEL", "VERSION")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from edgelm.pull import PullError, pull
    from edgelm.serve.config import default_models_dir

    def show(p: dict[str, object]) -> None:
        total, done = p.get("total"), p.get("completed")
        if isinstance(total, int) and isinstance(done, int) and total:
            rate = float(p.get("rate", 0.0) or 0.0)  # type: ignore[arg-type]
            bar = "#" * int(30 * done / total)
            sys.stderr.write(f"\r{p['status']}: [{bar:<30}] {done / 2**20:7.1f}/{total / 2**20:.1f} MiB "
                             f"{rate / 2**20:6.1f} MiB/s")
            if done == total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(f"{p['status']}\n")
        sys.stderr.flush()

    if args.list:
        from edgelm.pull import load_catalogue

        for key, e in load_catalogue().items():
            print(f"{key:32} {e.get('size', 0) / 2**20:8.1f} MiB  {', '.join(e.get('aliases', []))}")
            print(f"{'':32} {e.get('description', '')}")
        return 0
    if not args.source:
        print("edgelm: pull needs a SOURCE (or --list)", file=sys.stderr)
        return 2
    models_dir = Path(args.models_dir or default_models_dir()).expanduser()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        path = asyncio.run(pull(args.source, models_dir, args.sha256, show, headers, args.interfaces or None))
    except PullError as e:
        print(f"edgelm: pull failed: {e}" + (f" ({e.detail})" if e.detail else ""), file=sys.stderr)
        return 1
    print(path)
    return 0


_SERVE_FLAGS = ("model", "models_dir", "served_model_name", "host", "port", "threads", "kernel_level",
                "kv_cache_mib", "max_context", "max_running", "max_step_tokens", "max_queue",
                "request_timeout_s", "shutdown_grace_s", "log_level", "mdns_name", "state_dir",
                "memory_budget_mib", "max_loaded_models", "keep_alive", "max_tool_rounds", "device",
                "allowed_hosts", "allowed_origins", "max_connections", "header_timeout_s", "idle_timeout_s",
                "max_pull_mib")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm", description="LLM inference for edge devices")
    p.add_argument("--version", action="version", version=f"edgelm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="generate a continuation of a prompt")
    r.add_argument("model", help="path to a GGUF file")
    r.add_argument("prompt")
    r.add_argument("-n", "--max-tokens", type=int, default=128)
    r.add_argument("-t", "--threads", type=_positive_int, default=None, help="compute threads (default: physical cores)")
    r.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    r.add_argument("--top-k", type=int, default=40)
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--special", action="store_true", help="parse special-token text in the prompt")
    r.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="describe a GGUF model file")
    i.add_argument("model")
    i.add_argument("--summary", action="store_true", help="omit the per-tensor table")
    i.add_argument("--tensors", action="store_true", help=argparse.SUPPRESS)  # the table is the default now
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="run the HTTP daemon",
                       description="Serve a model over an OpenAI-compatible HTTP API. Settings come from the YAML "
                                   "config (--config, $EDGELM_CONFIG, ./edgelm.yaml, ~/.config/edgelm/edgelm.yaml, "
                                   "/etc/edgelm/edgelm.yaml), then EDGELM_<KEY> variables, then these flags.")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--print-config", action="store_true", help="print the merged configuration and exit")
    s.add_argument("-m", "--model", help="GGUF path, or a file name in models_dir (default: SmolLM2-135M-Instruct)")
    s.add_argument("--models-dir")
    s.add_argument("--served-model-name")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("-t", "--threads", type=int)
    s.add_argument("--kernel-level")
    s.add_argument("--device", help="auto (default: GPU 0 if usable), cpu, cuda or cuda:N")
    s.add_argument("--kv-cache-mib", type=int)
    s.add_argument("--max-context", type=int)
    s.add_argument("--max-running", type=int)
    s.add_argument("--max-step-tokens", type=int)
    s.add_argument("--max-queue", type=int)
    s.add_argument("--memory-budget-mib", type=int, help="memory for all loaded models (default: 3/4 of MemAvailable)")
    s.add_argument("--max-loaded-models", type=int)
    s.add_argument("--keep-alive", help='how long an on-demand model stays after its last request ("5m", "0", "-1")')
    s.add_argument("--max-tool-rounds", type=int)
    s.add_argument("--request-timeout-s", type=float)
    s.add_argument("--shutdown-grace-s", type=float)
    s.add_argument("--log-level")
    s.add_argument("--no-prefix-cache", action="store_true")
    s.add_argument("--no-mdns", action="store_true", help="do not advertise on the LAN")
    s.add_argument("--mdns-name")
    s.add_argument("--state-dir")
    s.add_argument("--allowed-hosts", help="extra Host names clients may use, comma-separated (\"*\": no check)")
    s.add_argument("--allowed-origins", help="browser origins allowed to call the API (CORS), comma-separated")
    s.add_argument("--max-connections", type=int)
    s.add_argument("--header-timeout-s", type=float)
    s.add_argument("--idle-timeout-s", type=float)
    s.add_argument("--max-pull-mib", type=int)
    s.set_defaults(func=cmd_serve)

    dsc = sub.add_parser("discover", help="list edgelm daemons on the LAN (mDNS)")
    dsc.add_argument("--timeout", type=float, default=3.0, help="seconds to listen")
    dsc.add_argument("--json", action="store_true")
    dsc.add_argument("--interfaces", nargs="*", help="only these interface addresses (default: all)")
    dsc.set_defaults(func=cmd_discover)

    pl = sub.add_parser("pull", help="download a GGUF model into the models directory (resumable, sha256-checked)")
    pl.add_argument("source", nargs="?", help="a catalogue name (see --list), https://…/FILE.gguf, "
                                              "edgelm://HOST:PORT/FILE.gguf, or FILE.gguf (ask the LAN)")
    pl.add_argument("--list", action="store_true", help="list the catalogue of known models")
    pl.add_argument("--models-dir", help="default: $EDGELM_MODELS_DIR or ~/.cache/edgelm/models")
    pl.add_argument("--sha256", help="expected digest")
    pl.add_argument("--api-key", help="key for a daemon that requires one (or EDGELM_API_KEY)",
                    default=os.environ.get("EDGELM_API_KEY"))
    pl.add_argument("--interfaces", nargs="*", help="mDNS interfaces for FILE.gguf lookups (default: all)")
    pl.set_defaults(func=cmd_pull)

    q = sub.add_parser("quantize", help="re-encode a GGUF file's weights (llama-quantize's types and mixes)",
                       description="Quantize IN into OUT. TYPE is a llama.cpp file type: F32 F16 BF16 Q4_0 Q4_1 Q5_0 "
                                   "Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K (Q4_K = "
                                   "Q4_K_M). Mixes give some tensors more bits, as llama-quantize does; the output "
                                   "is written to a temporary file and renamed when complete.")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("type")
    q.add_argument("-t", "--threads", type=_positive_int, default=None, help="worker threads (default: physical cores)")
    q.add_argument("--pure", action="store_true", help="every quantizable tensor gets TYPE (no mix rules)")
    q.add_argument("--dry-run", action="store_true", help="print each tensor's new type and size, write nothing")
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("convert", help="import an ONNX decoder-only model (float or int4 MatMulNBits) as GGUF",
                       description="Convert a llama-family model exported to ONNX (Hugging Face Optimum or "
                                   "onnxruntime-genai layouts) to GGUF. config.json and tokenizer.json are read from "
                                   "the model's directory unless given. Needs the `onnx` package.")
    c.add_argument("model", help="model.onnx (external data files beside it are read too)")
    c.add_argument("output")
    c.add_argument("--type", default="F16", choices=["F32", "F16"],
                   help="type for float weights (int4 weights keep their blocks as Q4_0/Q4_1)")
    c.add_argument("--tokenizer", help="tokenizer.json (default: beside the model)")
    c.add_argument("--config", help="Hugging Face config.json (default: beside the model)")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgelmError as e:
        print(f"edgelm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgelm info M | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

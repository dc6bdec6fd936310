"""The `edgelm` command.

    edgelm run MODEL "prompt"     stream a continuation to the terminal
    edgelm info MODEL             architecture, sizes, quant types, tokenizer
    edgelm serve [--config F]     the HTTP daemon (OpenAI- and Ollama-compatible API)
    edgelm discover [--json]      edgelm daemons on the LAN (mDNS)
    edgelm pull SOURCE            a GGUF into the models directory (URL, edgelm://, LAN)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Sequence

from edgelm import EdgelmError, __version__


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    from edgelm import Model

    m = Model(args.model, n_threads=1)
    md = m.metadata
    nm = m.native
    print(f"file:          {m.path} ({_fmt_bytes(nm.file_size)}, GGUF v{nm.gguf_version})")
    print(f"name:          {md.get('general.name', '?')}")
    print(f"architecture:  {m.architecture}")
    print(f"layers:        {nm.n_layer}   embedding: {nm.n_embd}   heads: {nm.n_head} (kv {nm.n_head_kv})")
    print(f"context:       {m.n_ctx_train} tokens (trained)")
    print(f"vocabulary:    {m.n_vocab} tokens, tokenizer {nm.tokenizer_model!r} pre {nm.tokenizer_pre!r}, "
          f"bos {nm.bos} eos {nm.eos}")
    print(f"chat template: {'yes' if 'tokenizer.chat_template' in md else 'no'}")
    by_type: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for _, _, ty, nbytes in m.tensors():
        by_type[ty] += nbytes
        count[ty] += 1
    print("tensor types:")
    for ty, nbytes in by_type.most_common():
        print(f"  {ty:6s} {count[ty]:4d} tensors  {_fmt_bytes(nbytes)}")
    print(f"weights read per token: {_fmt_bytes(nm.weight_bytes_per_token)}")
    from edgelm import _native

    print(f"CPU kernels:   {m.kernel_level} (this CPU can run: {', '.join(_native.available_kernel_levels())}; "
          f"EDGELM_KERNEL_LEVEL lowers it), {_native.physical_cores()} physical cores")
    if args.tensors:
        for name, dims, ty, nbytes in m.tensors():
            print(f"  {name:40s} {ty:6s} {str(dims):20s} {_fmt_bytes(nbytes)}")
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
        import dataclasses

        import yaml

        print(f"# from {path or 'defaults'} + environment + flags")
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
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
        print(f"edgelm: pull failed: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


_SERVE_FLAGS = ("model", "models_dir", "served_model_name", "host", "port", "threads", "kernel_level",
                "kv_cache_mib", "max_context", "max_running", "max_step_tokens", "max_queue",
                "request_timeout_s", "shutdown_grace_s", "log_level", "mdns_name", "state_dir",
                "memory_budget_mib", "max_loaded_models", "keep_alive", "max_tool_rounds", "device")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelm", description="LLM inference for edge devices")
    p.add_argument("--version", action="version", version=f"edgelm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="generate a continuation of a prompt")
    r.add_argument("model", help="path to a GGUF file")
    r.add_argument("prompt")
    r.add_argument("-n", "--max-tokens", type=int, default=128)
    r.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: physical cores)")
    r.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    r.add_argument("--top-k", type=int, default=40)
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--special", action="store_true", help="parse special-token text in the prompt")
    r.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("info", help="describe a GGUF model file")
    i.add_argument("model")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
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


if __name__ == "__main__":
    sys.exit(main())

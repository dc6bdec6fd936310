"""The `edgelm` command.

edgelm run NAME ["prompt"]    chat in the terminal (or answer once); pulls NAME first
edgelm pull NAME|SOURCE       a model into the models directory (Ollama registry,
                              hf.co, catalogue, URL, edgelm://, LAN)
edgelm list | ps              the models there | the models the daemon has loaded
edgelm show NAME              architecture, parameters, quantization, template, license
edgelm rm NAME… | cp SRC DST  remove | give another name (the daemon's, else the store)
edgelm stop NAME              unload a model from the daemon
edgelm info MODEL             architecture, sizes, quant types, tokenizer of any GGUF
edgelm serve [--config F]     the HTTP daemon (OpenAI- and Ollama-compatible API)
edgelm discover [--json]      edgelm daemons on the LAN (mDNS)
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
from datetime import timezone
from typing import Any, TextIO

from edgelm import EdgelmError, __version__


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    from edgelm import Model, _native
    from edgelm.modelinfo import QUANT

    version, file_size, md, tensors = _native.inspect_gguf(args.model)
    print(f"file:          {args.model} ({_fmt_bytes(file_size)}, GGUF v{version})")
    print(f"name:          {md.get('general.name', '?')}")
    arch = md.get("general.architecture", "?")
    ftype = md.get("general.file_type")
    print(f"architecture:  {arch}   file type: {QUANT.get(ftype, ftype) if ftype is not None else '?'}")
    n_params = sum(_n_elements(dims) for _, dims, _, _ in tensors)
    total = sum(nb for *_, nb in tensors) or 1
    print(
        f"tensors:       {len(tensors)}, {n_params / 1e6:.1f} M weights, {_fmt_bytes(total)}, "
        f"{8 * total / max(n_params, 1):.2f} bits per weight"
    )
    by_type: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    elems: collections.Counter[str] = collections.Counter()
    for _, dims, ty, nbytes in tensors:
        by_type[ty] += nbytes
        count[ty] += 1
        elems[ty] += _n_elements(dims)
    print("bytes per type:")
    for ty, nbytes in by_type.most_common():
        print(
            f"  {ty:6s} {count[ty]:5d} tensors  {_fmt_bytes(nbytes):>10s}  {100 * nbytes / total:5.1f}%  "
            f"{8 * nbytes / max(elems[ty], 1):5.2f} bits/weight"
        )
    try:
        m = Model(args.model, n_threads=1)
    except EdgelmError as e:
        print(f"edgelm cannot run it: {e}")
    else:
        nm = m.native
        print(f"layers:        {nm.n_layer}   embedding: {nm.n_embd}   heads: {nm.n_head} (kv {nm.n_head_kv})")
        print(f"context:       {m.n_ctx_train} tokens (trained)")
        print(
            f"vocabulary:    {m.n_vocab} tokens, tokenizer {nm.tokenizer_model!r} pre {nm.tokenizer_pre!r}, "
            f"bos {nm.bos} eos {nm.eos}"
        )
        print(f"chat template: {'yes' if 'tokenizer.chat_template' in md else 'no'}")
        print(f"weights read per token: {_fmt_bytes(nm.weight_bytes_per_token)}")
        print(
            f"CPU kernels:   {m.kernel_level} (this CPU can run: {', '.join(_native.available_kernel_levels())}; "
            f"EDGELM_KERNEL_LEVEL lowers it), {_native.physical_cores()} physical cores"
        )
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
        s = _native.quantize_file(
            args.input, args.output, args.type, threads=args.threads, pure=args.pure, progress=bar
        )
    finally:
        bar.close()
    in_size = os.path.getsize(args.input)
    print(
        f"wrote {args.output}: {s['ftype']}, {_fmt_bytes(s['out_file_bytes'])} (from {_fmt_bytes(in_size)}), "
        f"{s['n_tensors']} tensors ({s['n_converted']} re-encoded, {s['n_fallback']} fell back to a 32-block type), "
        f"{s['seconds']:.2f} s, {s['in_tensor_bytes'] / max(s['seconds'], 1e-9) / 1e6:.0f} MB/s of input"
    )
    for ty, n, nbytes in s["by_type"]:
        print(f"  {ty:6s} {n:5d} tensors  {_fmt_bytes(nbytes)}")
    if s["n_requantized"]:
        print(
            f"note: {s['n_requantized']} tensors were already quantized in {args.input}; re-encoding them adds "
            f"error on top of theirs. Quantize from the F16/BF16/F32 original where you have it.",
            file=sys.stderr,
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from edgelm.convert import convert_onnx

    bar = _ProgressBar("converting")
    try:
        info = convert_onnx(
            args.model, args.output, tokenizer=args.tokenizer, config=args.config, out_type=args.type, progress=bar
        )
    finally:
        bar.close()
    print(
        f"wrote {args.output}: {info['architecture']}, {info['n_layer']} layers, {info['n_tensors']} tensors, "
        f"{_fmt_bytes(info['file_bytes'])}"
    )
    for ty, n in sorted(info["types"].items()):
        print(f"  {ty:6s} {n:5d} tensors")
    return 0


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags given, as Ollama options."""
    out: dict[str, object] = {}
    for flag, key in (
        ("max_tokens", "num_predict"),
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("seed", "seed"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            out[key] = v
    return out


def _backend(args: argparse.Namespace) -> object:
    """Where `edgelm run` gets its answers: the daemon when it answers, else the model
    loaded here; a name that is not there yet is pulled first."""
    from pathlib import Path

    from edgelm import store
    from edgelm.chat_cli import DaemonBackend, LocalBackend
    from edgelm.client import ClientError, Daemon, find_local, settings

    opts = _options(args)
    p = Path(args.model).expanduser()
    if p.is_file():
        return LocalBackend(p, p.stem, None, None, opts, args.threads)
    s = settings()
    daemon = None if args.local else Daemon.find(s)
    if daemon is not None:
        try:
            daemon.request("POST", "/api/show", {"model": args.model})
        except ClientError as e:
            if e.status != 404:
                raise
            _pull_through(daemon, args.model)
        return DaemonBackend(daemon, args.model, opts)
    found = find_local(s.models_dir, args.model)
    if found is None:
        if (
            cmd_pull(
                argparse.Namespace(
                    source=args.model,
                    list=False,
                    models_dir=str(s.models_dir),
                    sha256=None,
                    api_key=None,
                    interfaces=None,
                )
            )
            != 0
        ):
            return None
        found = find_local(s.models_dir, args.model)
        if found is None:
            raise EdgelmError(f"'{args.model}' was pulled but is not in {s.models_dir}")
    st = store.Store(s.models_dir) if found.entry is not None else None
    return LocalBackend(found.path, found.name, found.entry, st, opts, args.threads)


def _pull_through(daemon: object, name: str) -> None:
    """Pull `name` through the daemon's /api/pull, with its progress on stderr."""
    from edgelm.client import Daemon

    assert isinstance(daemon, Daemon)
    show = _pull_progress()
    for line in daemon.stream("/api/pull", {"model": name, "stream": True}):
        show(line)


def cmd_run(args: argparse.Namespace) -> int:
    from edgelm.chat_cli import answer_once, session

    backend = _backend(args)
    if backend is None:
        return 1
    prompt = " ".join(args.prompt) if args.prompt else None
    piped = None if sys.stdin.isatty() else sys.stdin.read()
    think = False if args.nothink else (True if args.think else None)
    if piped is not None or prompt is not None:
        text = "\n\n".join(x for x in (piped.strip() if piped else None, prompt) if x)
        return answer_once(
            backend,  # type: ignore[arg-type]
            text,
            args.system,
            think,
            args.raw,
            sys.stdout,
            sys.stderr,
            args.hidethinking,
            args.verbose,
        )
    return session(
        backend,  # type: ignore[arg-type]
        args.system,
        think,
        sys.stdout,
        sys.stderr,
        args.hidethinking,
        args.verbose,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from edgelm.config import ConfigError, load_config
    from edgelm.daemon.main import run

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

    from edgelm.daemon.mdns import discover

    found = discover(args.timeout, args.interfaces or None)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no edgelm daemon answered within {args.timeout:g} s", file=sys.stderr)
        return 1
    rows = [
        (d["name"], d["url"], d.get("model", ""), d.get("state", ""), d.get("accel", ""), d.get("ver", ""))
        for d in found
    ]
    head = ("NAME", "URL", "MODEL", "STATE", "ACCEL", "VERSION")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _pull_progress() -> Any:
    """Pull progress on stderr: a bar a layer on a terminal, plain lines otherwise."""
    from edgelm.pull import ProgressLog

    if not sys.stderr.isatty():
        return ProgressLog(lambda line: print(line, file=sys.stderr, flush=True), "", every_s=10.0)
    state = {"status": None}

    def show(p: dict[str, Any]) -> None:
        status, total, done = p.get("status"), p.get("total"), p.get("completed")
        if isinstance(total, int) and isinstance(done, int) and total:
            frac = min(done / total, 1.0)
            rate = float(p.get("rate") or 0.0)
            bar = "█" * int(25 * frac)
            sys.stderr.write(
                f"\r{status}: {100 * frac:3.0f}% ▕{bar:<25}▏ {_fmt_bytes(done)}/{_fmt_bytes(total)}"
                + (f" {_fmt_bytes(rate)}/s" if rate else "")
                + "\x1b[K"
            )
            state["status"] = status
        else:
            if state["status"] is not None:
                sys.stderr.write("\n")
            sys.stderr.write(f"{status}\n")
            state["status"] = None
        sys.stderr.flush()

    return show


def cmd_pull(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from edgelm.client import settings
    from edgelm.pull import PullError, pull
    from edgelm.registry import Registries

    if args.list:
        from edgelm.pull import load_catalogue

        for key, e in load_catalogue().items():
            print(f"{key:32} {e.get('size', 0) / 2**20:8.1f} MiB  {', '.join(e.get('aliases', []))}")
            print(f"{'':32} {e.get('description', '')}")
        return 0
    if not args.source:
        print("edgelm: pull needs a SOURCE (or --list)", file=sys.stderr)
        return 2
    s = settings()
    models_dir = Path(args.models_dir).expanduser() if args.models_dir else s.models_dir
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        path = asyncio.run(
            pull(
                args.source,
                models_dir,
                args.sha256,
                _pull_progress(),
                headers,
                args.interfaces or None,
                registries=Registries(s.registry_url, s.hf_url),
            )
        )
    except PullError as e:
        print(f"edgelm: pull failed: {e}" + (f" ({e.detail})" if e.detail else ""), file=sys.stderr)
        return 1
    print(path)
    return 0


# -- the models: list, ps, show, rm, cp, stop (the daemon when it answers, else the store)


def _ago(iso: str) -> str:
    from datetime import datetime

    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    s = (datetime.now(timezone.utc) - t).total_seconds()
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if abs(s) >= n:
            k = int(abs(s) // n)
            text = f"{k} {unit}{'s' if k != 1 else ''}"
            return f"{text} ago" if s > 0 else f"{text} from now"
    return "just now" if s >= 0 else "in a moment"


def _table(head: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("    ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    from edgelm.client import Daemon, list_local, settings
    from edgelm.modelinfo import iso

    s = settings()
    d = Daemon.find(s)
    rows = []
    if d is not None:
        for m in d.request("GET", "/api/tags")["models"]:
            rows.append(
                (m["name"], str(m.get("digest", ""))[:12], _fmt_bytes(m.get("size", 0)), _ago(m.get("modified_at", "")))
            )
    else:
        for m in list_local(s.models_dir):
            digest = (m.entry.digest or "")[7:19] if m.entry is not None else ""
            name = m.name if ":" in m.name else f"{m.name}:latest"
            rows.append((name, digest, _fmt_bytes(m.path.stat().st_size), _ago(iso(m.path.stat().st_mtime))))
    _table(("NAME", "ID", "SIZE", "MODIFIED"), rows)
    return 0


def _no_daemon(url: str, what: str) -> int:
    print(
        f"edgelm: no daemon answers at {url} ({what}); start one with `edgelm serve`, or set EDGELM_URL",
        file=sys.stderr,
    )
    return 1


def cmd_ps(args: argparse.Namespace) -> int:
    from edgelm.client import Daemon, settings

    s = settings()
    d = Daemon.find(s)
    if d is None:
        return _no_daemon(s.url, "nothing is loaded")
    rows = []
    for m in d.request("GET", "/api/ps")["models"]:
        where = "100% GPU" if m.get("size_vram") else "100% CPU"
        until = "forever" if str(m.get("expires_at", "")).startswith("2318") else _ago(m.get("expires_at", ""))
        rows.append(
            (
                m["name"],
                str(m.get("digest", ""))[:12],
                _fmt_bytes(m.get("size", 0)),
                where,
                str(m.get("context_length", "")),
                until,
            )
        )
    _table(("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"), rows)
    return 0


def _show_info(name: str) -> dict[str, Any]:
    from edgelm import modelinfo, store
    from edgelm.client import Daemon, find_local, settings

    s = settings()
    d = Daemon.find(s)
    if d is not None:
        return dict(d.request("POST", "/api/show", {"model": name}))
    found = find_local(s.models_dir, name)
    if found is None:
        raise EdgelmError(
            f"model '{name}' not found in {s.models_dir}; `edgelm list` shows the models, "
            f"`edgelm pull {name}` fetches it"
        )
    md = modelinfo.read_metadata(found.path)
    return modelinfo.describe(found.path, md, found.entry, store.Store(s.models_dir))


def cmd_show(args: argparse.Namespace) -> int:
    info = _show_info(args.model)
    for flag, key in (
        ("license", "license"),
        ("modelfile", "modelfile"),
        ("parameters", "parameters"),
        ("template", "template"),
        ("system", "system"),
    ):
        if getattr(args, flag):
            print(info.get(key) or "")
            return 0
    md = info.get("model_info") or {}
    arch = str(md.get("general.architecture", info.get("details", {}).get("family", "")))
    rows = [
        ("architecture", arch),
        ("parameters", info.get("details", {}).get("parameter_size") or ""),
        ("context length", str(md.get(f"{arch}.context_length", ""))),
        ("embedding length", str(md.get(f"{arch}.embedding_length", ""))),
        ("quantization", info.get("details", {}).get("quantization_level") or ""),
    ]
    print("  Model")
    for k, v in rows:
        if v:
            print(f"    {k:<20}{v}")
    print("\n  Capabilities")
    for c in info.get("capabilities") or []:
        print(f"    {c}")
    if info.get("parameters"):
        print("\n  Parameters")
        for line in str(info["parameters"]).splitlines():
            print(f"    {line}")
    if info.get("system"):
        print("\n  System")
        print("    " + str(info["system"]).strip().splitlines()[0][:100])
    if info.get("license"):
        print("\n  License")
        for line in [x for x in str(info["license"]).strip().splitlines() if x.strip()][:2]:
            print(f"    {line.strip()[:100]}")
    if args.verbose and info.get("template"):
        print("\n  Template")
        for line in str(info["template"]).splitlines():
            print(f"    {line}")
    print()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from edgelm import store
    from edgelm.client import Daemon, find_local, settings

    s = settings()
    d = Daemon.find(s)
    for name in args.model:
        if d is not None:
            d.request("DELETE", "/api/delete", {"model": name})
        else:
            found = find_local(s.models_dir, name)
            if found is None:
                raise EdgelmError(f"model '{name}' not found in {s.models_dir}; `edgelm list` shows the models")
            st = store.Store(s.models_dir)
            entry = st.lookup(name)
            if entry is not None:
                st.remove(name)
            else:
                st.forget_file(found.path.name)
                found.path.unlink()
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from edgelm import store
    from edgelm.client import Daemon, find_local, model_files, settings

    s = settings()
    d = Daemon.find(s)
    if d is not None:
        d.request("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    else:
        found = find_local(s.models_dir, args.source)
        if found is None:
            raise EdgelmError(f"model '{args.source}' not found in {s.models_dir}; `edgelm list` shows the models")
        dst = store.check_name(args.destination)
        if any(store.normalize(dst) == store.normalize(p.stem) for p in model_files(s.models_dir)):
            raise EdgelmError(f"'{args.destination}' is a model file's own name; choose another")
        st = store.Store(s.models_dir)
        if found.entry is not None:
            st.copy(found.entry, dst)
        else:
            st.name_file(dst, found.path.name)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgelm.install import install

    for line in install(Path(args.root), args.exec, enable=not args.no_enable):
        print(line)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from edgelm.client import Daemon, settings

    s = settings()
    d = Daemon.find(s)
    if d is None:
        return _no_daemon(s.url, "nothing is loaded, so nothing to stop")
    loaded = {m["name"] for m in d.request("GET", "/api/ps")["models"]} | {
        m["model"] for m in d.request("GET", "/api/ps")["models"]
    }
    want = args.model if ":" in args.model.rsplit("/", 1)[-1] else f"{args.model}:latest"
    if args.model not in loaded and want not in loaded:
        raise EdgelmError(f"'{args.model}' is not loaded (`edgelm ps` shows what is)")
    d.request("POST", "/api/generate", {"model": args.model, "keep_alive": 0})
    return 0


_SERVE_FLAGS = (
    "model",
    "models_dir",
    "served_model_name",
    "host",
    "port",
    "threads",
    "kernel_level",
    "kv_cache_mib",
    "max_context",
    "max_running",
    "max_step_tokens",
    "max_queue",
    "request_timeout_s",
    "shutdown_grace_s",
    "log_level",
    "log_format",
    "mdns_name",
    "state_dir",
    "memory_budget_mib",
    "max_loaded_models",
    "keep_alive",
    "max_tool_rounds",
    "device",
    "allowed_hosts",
    "allowed_origins",
    "max_connections",
    "header_timeout_s",
    "idle_timeout_s",
    "max_pull_mib",
)


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

    r = sub.add_parser(
        "run",
        help="chat with a model (pulled first if missing)",
        description="Chat with NAME using its chat template: a session in the terminal, or one "
        "answer to PROMPT (or to text piped in). The running daemon answers when it is "
        "up; else the model is loaded here. A name not yet pulled is pulled first.",
    )
    r.add_argument("model", help="a model name (qwen3:0.6b, hf.co/USER/REPO:Q4_K_M, a file id) or a GGUF path")
    r.add_argument("prompt", nargs="*", help="answer this once and exit")
    r.add_argument("-n", "--max-tokens", type=int, default=None, help="at most this many tokens an answer")
    r.add_argument(
        "-t", "--threads", type=_positive_int, default=None, help="compute threads (default: physical cores)"
    )
    r.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 0.8)")
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--system", help="a system message")
    r.add_argument("--think", action="store_true", help="ask a thinking model to think (the default for one)")
    r.add_argument("--nothink", action="store_true", help="ask a thinking model to answer at once")
    r.add_argument("--hidethinking", action="store_true", help="do not show a thinking model's thought")
    r.add_argument("--raw", action="store_true", help="continue PROMPT as plain text, without the chat template")
    r.add_argument("--local", action="store_true", help="load the model here even if a daemon is running")
    r.add_argument("-v", "--verbose", action="store_true", help="after each answer, its token counts and speed")
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("install-service", help="run this edgelm as a systemd service (unit, config; enables it)")
    sv.add_argument("--root", default="/", help="install into this directory tree instead (nothing is enabled)")
    sv.add_argument("--exec", help="the edgelm command the unit runs (default: this installation's)")
    sv.add_argument("--no-enable", action="store_true", help="write the files only")
    sv.set_defaults(func=cmd_install_service)

    ls = sub.add_parser("list", aliases=["ls"], help="the models in the models directory, under every name")
    ls.set_defaults(func=cmd_list)
    ps = sub.add_parser("ps", help="the models the daemon has loaded")
    ps.set_defaults(func=cmd_ps)
    sh = sub.add_parser("show", help="a model's architecture, parameters, quantization, context, template, license")
    sh.add_argument("model")
    for flag in ("license", "modelfile", "parameters", "template", "system"):
        sh.add_argument(f"--{flag}", action="store_true", help=f"print only the {flag}")
    sh.add_argument("-v", "--verbose", action="store_true", help="also print the template")
    sh.set_defaults(func=cmd_show)
    rm = sub.add_parser("rm", help="remove models (a blob goes when no name uses it)")
    rm.add_argument("model", nargs="+")
    rm.set_defaults(func=cmd_rm)
    cp = sub.add_parser("cp", help="give a model another name (no bytes are copied)")
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.set_defaults(func=cmd_cp)
    st = sub.add_parser("stop", help="unload a model from the daemon")
    st.add_argument("model")
    st.set_defaults(func=cmd_stop)

    i = sub.add_parser("info", help="describe a GGUF model file")
    i.add_argument("model")
    i.add_argument("--summary", action="store_true", help="omit the per-tensor table")
    i.add_argument("--tensors", action="store_true", help=argparse.SUPPRESS)  # the table is the default now
    i.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "serve",
        help="run the HTTP daemon",
        description="Serve a model over an OpenAI-compatible HTTP API. Settings come from the YAML "
        "config (--config, $EDGELM_CONFIG, ./edgelm.yaml, ~/.config/edgelm/edgelm.yaml, "
        "/etc/edgelm/edgelm.yaml), then EDGELM_<KEY> variables, then these flags.",
    )
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
    s.add_argument("--log-format", choices=["text", "json"])
    s.add_argument("--no-prefix-cache", action="store_true")
    s.add_argument("--no-mdns", action="store_true", help="do not advertise on the LAN")
    s.add_argument("--mdns-name")
    s.add_argument("--state-dir")
    s.add_argument("--allowed-hosts", help='extra Host names clients may use, comma-separated ("*": no check)')
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

    pl = sub.add_parser("pull", help="download a model into the models directory (resumable, digest-checked)")
    pl.add_argument(
        "source",
        nargs="?",
        help="a name from the Ollama registry (qwen3:0.6b, user/model:tag), "
        "hf.co/USER/REPO[:QUANT], a catalogue name (see --list), "
        "https://…/FILE.gguf, edgelm://HOST:PORT/FILE.gguf, or FILE.gguf "
        "(ask the LAN)",
    )
    pl.add_argument("--list", action="store_true", help="list the catalogue of known models")
    pl.add_argument("--models-dir", help="default: the config's, $EDGELM_MODELS_DIR or ~/.cache/edgelm/models")
    pl.add_argument("--sha256", help="expected digest")
    pl.add_argument(
        "--api-key",
        help="key for a daemon that requires one (or EDGELM_API_KEY)",
        default=os.environ.get("EDGELM_API_KEY"),
    )
    pl.add_argument("--interfaces", nargs="*", help="mDNS interfaces for FILE.gguf lookups (default: all)")
    pl.set_defaults(func=cmd_pull)

    q = sub.add_parser(
        "quantize",
        help="re-encode a GGUF file's weights (llama-quantize's types and mixes)",
        description="Quantize IN into OUT. TYPE is a llama.cpp file type: F32 F16 BF16 Q4_0 Q4_1 Q5_0 "
        "Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K (Q4_K = "
        "Q4_K_M). Mixes give some tensors more bits, as llama-quantize does; the output "
        "is written to a temporary file and renamed when complete.",
    )
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("type")
    q.add_argument("-t", "--threads", type=_positive_int, default=None, help="worker threads (default: physical cores)")
    q.add_argument("--pure", action="store_true", help="every quantizable tensor gets TYPE (no mix rules)")
    q.add_argument("--dry-run", action="store_true", help="print each tensor's new type and size, write nothing")
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser(
        "convert",
        help="import an ONNX decoder-only model (float or int4 MatMulNBits) as GGUF",
        description="Convert a llama-family model exported to ONNX (Hugging Face Optimum or "
        "onnxruntime-genai layouts) to GGUF. config.json and tokenizer.json are read from "
        "the model's directory unless given. Needs the `onnx` package.",
    )
    c.add_argument("model", help="model.onnx (external data files beside it are read too)")
    c.add_argument("output")
    c.add_argument(
        "--type",
        default="F16",
        choices=["F32", "F16"],
        help="type for float weights (int4 weights keep their blocks as Q4_0/Q4_1)",
    )
    c.add_argument("--tokenizer", help="tokenizer.json (default: beside the model)")
    c.add_argument("--config", help="Hugging Face config.json (default: beside the model)")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from edgelm.client import ClientError
    from edgelm.pull import PullError
    from edgelm.store import ModelNameError, StoreError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgelmError as e:
        print(f"edgelm: error: {e}", file=sys.stderr)
        return 2
    except (ClientError, StoreError, ModelNameError, PullError) as e:  # errors users meet: one line each
        print(f"edgelm: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"edgelm: the daemon stopped answering ({e.strerror or e}); is it still running?", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgelm info M | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The models a daemon serves: any GGUF in `models_dir` (plus the configured `model`),
loaded on first request, kept under a memory budget, and unloaded after `keep_alive`
of idleness.

    async with pool.use("SmolLM2-135M-Instruct.Q4_1") as lm:   # loads if needed
        stream = lm.engine.submit(...)

Memory. A Pi or a Jetson has one pool of DRAM shared by the CPU, the page cache that
holds the memory-mapped weights and (on a Jetson) the GPU, so the budget is one number:
`memory_budget_mib`, by default three quarters of MemAvailable when the daemon starts.
A model costs its file size (the weights, mapped and resident once touched) plus its
KV cache (`kv_cache_mib`, default a quarter of the budget, at most 2 GiB) plus a fixed
allowance for scratch. Loading a model that does not fit first unloads idle models,
least recently used first; if it still does not fit, the request fails with 503 and a
message that says what is loaded and what would be needed. At most
`max_loaded_models` are loaded at once.

Lifetime. Each model has a keep-alive: the configured `model` is loaded at start and
stays (until a request says otherwise); models loaded on demand stay `keep_alive`
(default "5m", Ollama's) after their last request ends. A request's `keep_alive`
(Ollama's field: "5m", 300, 0 = unload when done, negative = forever) replaces the
model's. A model with requests in flight is never unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm import EdgelmError, Model, _native, modelinfo, store
from edgelm._native import Executor
from edgelm.config import Config, parse_keep_alive
from edgelm.engine.embed import EmbedEngine, EmbedLimits
from edgelm.engine.loop import AsyncEngine
from edgelm.engine.metrics import Metrics
from edgelm.engine.reuse import ReuseConfig
from edgelm.engine.scheduler import SchedulerLimits
from edgelm.errors import NoMemory, NotFound
from edgelm.prompt.chat import ChatTemplate
from edgelm.prompt.gotemplate import GoTemplate, GoTemplateError
from edgelm.prompt.grammar import Grammars

log = logging.getLogger("edgelm.serve")

# On the CPU, prompt attention (the tiled kernel, f16 keys) costs per key and query
# head about CPU_KEY_WORK × (head_dim_k + head_dim_v + CPU_SCORE_WORK) multiply-adds of
# a matmul (quantized weights, int8 dot products): the Q·K and P·V products, and a
# per-score part (softmax, exp) that does not grow with the head. Fitted on this VM
# (2 threads, 8,000-token prompts) so that a prefill's steps stay level from its first
# chunk to its last: SmolLM2-135M (head 64, every layer global) and Gemma 3 270M (head
# 256, one layer in six global); a single factor without the per-score part was off by
# 2× between the two.
CPU_KEY_WORK = 1.2
CPU_SCORE_WORK = 240


def key_cost(model: Model) -> float:
    """The scheduler's `key_cost` on the CPU: the attention work of one key for one
    token (every query head of every layer that sees the whole context), in units of
    one token's work on the weights of the layers, from the model's shape. 0 (tokens
    only) when the shape cannot be read. Sliding-window layers are left out: their keys
    stop growing."""
    arch, md = model.architecture, model.metadata
    try:
        n_layer = int(md[f"{arch}.block_count"])
        n_head = int(md[f"{arch}.attention.head_count"])
        hd_k = int(md.get(f"{arch}.attention.key_length") or int(md[f"{arch}.embedding_length"]) // n_head)
        hd_v = int(md.get(f"{arch}.attention.value_length") or hd_k)
        n_global = n_layer
        if arch == "gemma3" and int(md.get("gemma3.attention.sliding_window") or 0) > 0:
            pattern = int(md.get("gemma3.attention.sliding_window_pattern") or 6)  # as rust/core model/config.rs
            n_global = n_layer // pattern if pattern else 0
        used = int(md.get(f"{arch}.expert_used_count") or 0)
        n_expert = int(md.get(f"{arch}.expert_count") or 0)
        weights = 0.0  # multiply-adds per token
        for name, shape, *_ in model.tensors():
            if name.startswith("blk.") and len(shape) >= 2:
                n = 1
                for d in shape:
                    n *= d
                weights += n * used / n_expert if len(shape) == 3 and n_expert else n
    except (KeyError, TypeError, ValueError):
        return 0.0
    if weights <= 0:
        return 0.0
    return CPU_KEY_WORK * n_global * n_head * (hd_k + hd_v + CPU_SCORE_WORK) / weights


BLOCK_SIZE = 16
SCRATCH_BYTES = 64 << 20
"""Allowance per model for activations, logits and the grammar vocabulary."""


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_id_of(path: Path) -> str:
    return path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name


@dataclass
class LoadedModel:
    """One model in memory, with its engine and everything a handler needs."""

    id: str
    path: Path
    model: Model
    engine: AsyncEngine | EmbedEngine  # an embedding model's batches inputs (embed_engine)
    template: ChatTemplate | GoTemplate
    grammars: Grammars
    max_context: int
    cost_bytes: int
    bos_id: int | None
    keep_alive_s: float | None
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)  # a pulled model's parameters layer
    system: str | None = None  # a pulled model's system prompt
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    n_users: int = 0
    expires_at: float | None = None  # wall clock; None = never
    _token_bytes: dict[int, bytes] = field(default_factory=dict)  # logprob pieces, filled as asked

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.expires_at = None if self.keep_alive_s is None else time.time() + self.keep_alive_s

    @property
    def busy(self) -> bool:
        return self.n_users > 0 or self.engine.n_active > 0

    def token_bytes(self, tid: int) -> bytes:
        b = self._token_bytes.get(tid)
        if b is None:
            b = self._token_bytes[tid] = self.model.native.token_bytes(tid, True)
        return b

    def token_str(self, tid: int) -> str:
        return self.token_bytes(tid).decode("utf-8", errors="replace")

    def chat_tokens(self, text: str) -> list[int]:
        ids = self.model.native.tokenize(text, True, True)
        # Templates that write the BOS text themselves get it twice from add_special.
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return ids


class ModelPool:
    def __init__(self, cfg: Config, metrics: Metrics, on_change: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.on_change = on_change
        avail = mem_available() or (4 << 30)
        self.budget_bytes = (cfg.memory_budget_mib << 20) if cfg.memory_budget_mib else avail * 3 // 4
        self.default_keep_alive = parse_keep_alive(cfg.keep_alive)
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._lock = asyncio.Lock()  # one load (and its evictions) at a time
        self.default_path = cfg.model_path()
        self.default_id = cfg.model_id()
        self._metadata: dict[tuple[str, int, float], dict[str, Any]] = {}
        self._device: tuple[str, dict[str, Any] | None] | None = None
        self._warming: set[asyncio.Future[Any]] = set()  # grammar vocabularies being built (threads)

    # -- names ---------------------------------------------------------------------
    def models_dir(self) -> Path:
        return Path(self.cfg.models_dir).expanduser()

    def model_store(self) -> store.Store:
        return store.Store(self.models_dir())

    def available(self) -> dict[str, Path]:
        """Every servable model: id → file (the configured model first), for the plain
        GGUF files of the models directory and the store's names of blobs."""
        out = {self.default_id: self.default_path}
        d = self.models_dir()
        if d.is_dir():
            for p in sorted(d.glob("*.gguf")):
                if p.is_file() and p.resolve() != self.default_path.resolve():
                    out.setdefault(model_id_of(p), p)
            for e in self.model_store().entries():
                if e.file is None:
                    out.setdefault(e.name, e.model)
        return out

    def resolve(self, name: str | None) -> tuple[str, Path]:
        """The model a request names (None: the configured one). Names are ids, file
        names, or the names of edgelm.store (pulled and copied names, the catalogue's
        aliases of present files); Ollama's ":latest" tag is accepted. A name of a plain
        file resolves to the file's id. Anything else is a 404 — a name is only ever
        looked up, never joined to a path."""
        if name is None or name == "":
            return self.default_id, self.default_path
        cands = (name, name.removesuffix(":latest"), name.removesuffix(".gguf"))
        for cand in cands:  # a loaded model: no directory scan on the request path
            lm = self.loaded.get(cand)
            if lm is not None:
                return lm.id, lm.path
        d = self.models_dir()
        avail = self.available()
        for cand in cands:
            if cand in avail:
                return cand, avail[cand]
        if name in (self.default_path.name, Path(self.cfg.model).name):
            return self.default_id, self.default_path
        e = self.model_store().lookup(name) if d.is_dir() else None
        if e is not None and e.file is None:
            lm = self.loaded.get(e.name)
            return (lm.id, lm.path) if lm is not None else (e.name, e.model)
        file = e.file if e is not None else (store.lookup_catalogue_file(d, name) if d.is_dir() else None)
        if file is not None:
            path = d / file
            if path.resolve() == self.default_path.resolve():
                return self.default_id, self.default_path
            return model_id_of(path), path
        raise NotFound(
            f"model '{name}' not found (available: {', '.join(sorted(avail))}); `edgelm pull {name}` or "
            "/api/pull fetches it",
            "model",
            "model_not_found",
        )

    def names(self) -> list[tuple[str, str, Path]]:
        """Every name a client can list: (name, model id, file) for each servable file
        and for each name the store keeps (pulled or copied names)."""
        avail = self.available()
        out = [(mid, mid, path) for mid, path in avail.items()]
        by_path = {p: mid for mid, p in avail.items()}
        if self.models_dir().is_dir():
            for e in self.model_store().entries():
                if e.file is not None and e.model in by_path:
                    out.append((e.name, by_path[e.model], e.model))
        return out

    def extras(self, mid: str) -> tuple[dict[str, Any], str | None]:
        """A model id's parameters and system prompt (a pulled name's layers; else none)."""
        e = self.entry(mid)
        if e is None:
            return {}, None
        st = self.model_store()
        return modelinfo.params_of(e, st), st.text_layer(e, store.SYSTEM)

    def entry(self, mid: str) -> store.Entry | None:
        """The store's entry for a model id (a pulled name), or None (a plain file)."""
        if not self.models_dir().is_dir():
            return None
        e = self.model_store().lookup(mid)
        return e if e is not None and e.file is None else None

    def in_use(self, path: Path) -> bool:
        """Whether `path` is a loaded model's file (a pull must not replace it)."""
        try:
            target = path.resolve()
        except OSError:
            return False
        return any(lm.path.resolve() == target for lm in self.loaded.values()) or (
            target == self.default_path.resolve() and self.default_id in self._loading
        )

    async def file_metadata(self, path: Path) -> dict[str, Any]:
        """A GGUF file's metadata (arrays longer than 64 left out), read without loading
        the model, cached per file version."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        md = self._metadata.get(key)
        if md is None:
            _, _, raw, _ = await asyncio.get_running_loop().run_in_executor(None, _native.inspect_gguf, str(path))
            md = {k: v for k, v in raw.items() if not (isinstance(v, list) and len(v) > 64)}
            self._metadata = {k: v for k, v in self._metadata.items() if k[0] != key[0]}
            self._metadata[key] = md
        return md

    # -- using models --------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, name: str | None, keep_alive: float | None | str = "default") -> AsyncIterator[LoadedModel]:
        """The named model, loaded if needed, held for the duration of the block;
        `keep_alive` (seconds, None = forever) replaces the model's when given — except
        for the configured model, which stays loaded whatever a request says (only an
        explicit unload, an admin action, takes it out)."""
        lm = await self.get(name)
        lm.n_users += 1
        try:
            yield lm
        finally:
            lm.n_users -= 1
            if keep_alive != "default" and lm.path != self.default_path:
                lm.keep_alive_s = keep_alive  # type: ignore[assignment]
            lm.touch()
            if lm.keep_alive_s == 0 and not lm.busy:
                await self.unload(lm.id)

    async def get(self, name: str | None) -> LoadedModel:
        mid, path = self.resolve(name)
        # Two names of one model (a copy) share one loaded model, unless their
        # parameters or system prompts differ.
        lm = self.loaded.get(mid)
        if lm is None:
            lm = next(
                (m for m in self.loaded.values() if m.path == path and (m.params, m.system) == self.extras(mid)), None
            )
        if lm is not None:
            lm.last_used = time.monotonic()
            return lm
        fut = self._loading.get(mid)
        if fut is None:
            fut = asyncio.ensure_future(self._load(mid, path))
            self._loading[mid] = fut
            fut.add_done_callback(lambda _: self._loading.pop(mid, None))
        return await asyncio.shield(fut)

    async def _load(self, mid: str, path: Path) -> LoadedModel:
        async with self._lock:
            if mid in self.loaded:
                return self.loaded[mid]
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            model, n_blocks, cost, device = await loop.run_in_executor(None, self._open, path)
            await self._make_room(mid, cost)
            if model.is_embedding:
                lm = self._embedding_model(mid, path, model, cost)
            else:
                parts, executor, eog = await loop.run_in_executor(None, self._build, mid, path, model, n_blocks, device)
                c = self.cfg
                max_running, max_step_tokens = c.step_limits(device)
                reuse = ReuseConfig(enabled=c.prompt_reuse != (mid in c.prompt_reuse_except))
                on_cpu = not str(parts["device"]).startswith("cuda")
                limits = SchedulerLimits(
                    max_running, max_step_tokens, c.max_queue, parts["max_context"], key_cost(model) if on_cpu else 0.0
                )
                log.info(
                    "%s: a step runs up to %d sequences and %d tokens; a key costs %.2g of a token (attention)",
                    mid,
                    max_running,
                    max_step_tokens,
                    limits.key_cost,
                )
                engine = AsyncEngine(
                    executor,
                    limits,
                    self.metrics,
                    eog,
                    c.prefix_cache,
                    gauges=self.update_gauges,
                    model=mid,
                    reuse=reuse,
                )
                lm = LoadedModel(engine=engine, cost_bytes=cost, **parts)
                # Warm the grammar engine's vocabulary in the background (a few seconds on a
                # small CPU), so the first structured-output request does not pay for it.
                warm = loop.run_in_executor(None, lm.grammars.tokenizer)
                self._warming.add(warm)
                warm.add_done_callback(self._warming.discard)
            lm.engine.start()
            lm.touch()
            self.loaded[mid] = lm
            log.info(
                "loaded %s in %.2fs (%.0f MiB of the %.0f MiB budget; %d models loaded)",
                mid,
                time.perf_counter() - t0,
                cost / 2**20,
                self.budget_bytes / 2**20,
                len(self.loaded),
            )
            self.metrics.models_loaded.set(len(self.loaded))
            if self.on_change is not None:
                self.on_change()
            return lm

    def device(self) -> tuple[str, dict[str, Any] | None]:
        """The device models run on ("cpu" or "cuda:N") and the GPU's details, from
        the `device` setting; "auto" takes GPU 0 when there is a usable one."""
        if self._device is not None:
            return self._device
        want = self.cfg.device
        if want == "cpu":
            self._device = ("cpu", None)
            return self._device
        ordinal = int(want.split(":", 1)[1]) if want.startswith("cuda:") else 0
        try:
            info = _native.cuda_device(ordinal)
        except EdgelmError as e:
            if want != "auto":
                raise EdgelmError(f"device {want!r} was asked for, but {e}") from None
            log.info("no usable GPU (%s); running on the CPU", e)
            self._device = ("cpu", None)
            return self._device
        log.info(
            "GPU %d: %s (sm_%d, %.1f of %.1f GiB free%s; kernels from %s)",
            ordinal,
            info["name"],
            info["arch"],
            info["free_bytes"] / 2**30,
            info["total_bytes"] / 2**30,
            ", memory shared with the CPU" if info["integrated"] else "",
            info["kernels_from"],
        )
        self._device = (f"cuda:{ordinal}", info)
        return self._device

    def served_context(self, model: Model, n_blocks: int) -> int:
        """Tokens per sequence: max_context, within the model's context and the KV cache."""
        return min(self.cfg.max_context or model.n_ctx_train, model.n_ctx_train, n_blocks * BLOCK_SIZE)

    def _open(self, path: Path) -> tuple[Model, int, int, str]:
        if not path.is_file():
            raise EdgelmError(
                f"model file {path} does not exist (set `model:` in the config, or fetch one with `edgelm pull`)"
            )
        model = Model(path, n_threads=self.cfg.threads, kernel_level=self.cfg.kernel_level, n_ctx=self.cfg.max_context)
        if model.is_embedding:
            # No KV cache to keep; one step's activations (a decoder embedder's scratch
            # cache, an encoder's q/k/v and feed-forward rows are of that size).
            step = self.cfg.step_limits("cpu")[1]
            return model, 0, path.stat().st_size + SCRATCH_BYTES + step * model.native.kv_bytes_per_token, "cpu"
        device, info = self.device()
        per_token = model.native.kv_bytes_per_token
        size = path.stat().st_size
        discrete = info is not None and not info["integrated"]
        if self.cfg.kv_cache_mib is not None:
            kv_budget = self.cfg.kv_cache_mib << 20
        elif discrete:
            # A discrete GPU's own memory: half of what the weights leave free.
            assert info is not None
            kv_budget = min(max(int(info["free_bytes"]) - size, 0) // 2, 32 << 30)
        else:
            kv_budget = min(self.budget_bytes // 4, 2 << 30)
        n_blocks = max(kv_budget // (per_token * BLOCK_SIZE), 1)
        # LongRoPE (Phi-3.5, Phi-4-mini) picks its RoPE factors by the context it runs
        # with, as llama.cpp does by its -c: the context served, which the KV cache may
        # hold below max_context. Loading again is a new mapping of the same file.
        served = self.served_context(model, n_blocks)
        if (model.native.rope_factors or "").startswith("rope_factors_") and served != (
            self.cfg.max_context or model.n_ctx_train
        ):
            model = Model(path, n_threads=self.cfg.threads, kernel_level=self.cfg.kernel_level, n_ctx=served)
        # Host memory: the mapped weights, and the KV cache unless it is on a GPU of
        # its own (on a Jetson the GPU's memory is the host's).
        cost = size + SCRATCH_BYTES + (0 if discrete else n_blocks * BLOCK_SIZE * per_token)
        return model, int(n_blocks), int(cost), device

    async def _make_room(self, mid: str, cost: int) -> None:
        def used() -> int:
            return sum(m.cost_bytes for m in self.loaded.values())

        def too_full() -> bool:
            return used() + cost > self.budget_bytes or len(self.loaded) >= self.cfg.max_loaded_models

        while too_full():
            idle = sorted((m for m in self.loaded.values() if not m.busy), key=lambda m: m.last_used)
            if not idle:
                break
            log.info("unloading %s to make room for %s", idle[0].id, mid)
            await self.unload(idle[0].id)
        if too_full():
            loaded = ", ".join(f"{m.id} ({m.cost_bytes / 2**20:.0f} MiB, busy)" for m in self.loaded.values()) or "none"
            raise NoMemory(
                f"not enough memory for model '{mid}': it needs {cost / 2**20:.0f} MiB and "
                f"{(self.budget_bytes - used()) / 2**20:.0f} MiB of the {self.budget_bytes / 2**20:.0f} MiB budget "
                f"is free (max_loaded_models {self.cfg.max_loaded_models}; loaded: {loaded}); retry when they are "
                f"idle, raise memory_budget_mib, or lower kv_cache_mib",
                "model",
                "insufficient_memory",
            )

    def _build(
        self, mid: str, path: Path, model: Model, n_blocks: int, device: str
    ) -> tuple[dict[str, Any], Executor, frozenset[int]]:
        """Everything but the engine (which starts on the event loop), off the loop."""
        native = model.native
        max_ctx = self.served_context(model, n_blocks)
        if max_ctx < 2:
            raise EdgelmError(f"the KV cache budget holds fewer than 2 tokens for {mid}")
        try:
            executor = Executor(native, n_blocks, device)
        except EdgelmError as e:
            if self.cfg.device != "auto" or device == "cpu":
                raise
            log.warning("%s cannot run on %s (%s); it runs on the CPU", mid, device, e)
            executor = Executor(native, n_blocks, "cpu")
        md = model.metadata
        tmpl = md.get("tokenizer.chat_template")
        bos, eos = native.bos, native.eos
        bos_s = native.detokenize([bos], True) if bos is not None else ""
        eos_s = native.detokenize([eos], True) if eos is not None else ""
        template: ChatTemplate | GoTemplate = ChatTemplate.for_model(
            tmpl if isinstance(tmpl, str) else None, model.architecture, bos_s, eos_s
        )
        eog = frozenset(t for t in range(model.n_vocab) if native.is_eog(t))
        keep = None if path == self.default_path else self.default_keep_alive
        entry = self.entry(mid)
        st = self.model_store()
        params, system = self.extras(mid)
        go = st.text_layer(entry, store.TEMPLATE) if entry is not None and not isinstance(tmpl, str) else None
        if go:  # the file has no chat template: the registry's (Ollama's Go template) is used
            try:
                template = GoTemplate(go)
            except GoTemplateError as e:
                log.warning(
                    "%s: the file has no chat template, and the registry's cannot be run (%s); it chats in its "
                    "architecture's turn format (or ChatML)",
                    mid,
                    e,
                )
        parts = {
            "id": mid,
            "path": path,
            "model": model,
            "template": template,
            "grammars": Grammars(native, eog),
            "params": params,
            "system": system,
            "max_context": max_ctx,
            "bos_id": bos,
            "keep_alive_s": keep,
            "device": executor.device,
        }
        rope = f", RoPE factors {native.rope_factors}" if native.rope_factors else ""
        log.info(
            "%s: %s on %s (CPU: %s kernels, %d threads); KV cache %d blocks × %d tokens, context %d%s",
            mid,
            model.architecture,
            executor.device,
            model.kernel_level,
            model.n_threads,
            n_blocks,
            BLOCK_SIZE,
            max_ctx,
            rope,
        )
        return parts, executor, eog

    def _embedding_model(self, mid: str, path: Path, model: Model, cost: int) -> LoadedModel:
        """An embedding model: no KV cache and no generation; its engine batches the
        inputs of every request (embed_engine). Encoders run on the CPU."""
        c = self.cfg
        max_running, max_step_tokens = c.step_limits("cpu")
        engine = EmbedEngine(
            model.native, EmbedLimits(max(max_running, 64), max_step_tokens, c.max_queue), self.metrics, mid
        )
        max_ctx = min(c.max_context or model.n_ctx_train, model.n_ctx_train)
        keep = None if path == self.default_path else self.default_keep_alive
        params, system = self.extras(mid)
        log.info(
            "%s: %s embedding model (pooling %s) on the CPU (%s kernels, %d threads), context %d",
            mid,
            model.architecture,
            model.native.pooling,
            model.kernel_level,
            model.n_threads,
            max_ctx,
        )
        return LoadedModel(
            id=mid,
            path=path,
            model=model,
            engine=engine,
            cost_bytes=cost,
            template=ChatTemplate.for_model(None, model.architecture, "", ""),
            grammars=Grammars(model.native, frozenset()),
            max_context=max_ctx,
            bos_id=model.native.bos,
            keep_alive_s=keep,
            params=params,
            system=system,
        )

    async def unload(self, mid: str) -> bool:
        lm = self.loaded.pop(mid, None)
        if lm is None:
            return False
        await lm.engine.drain(0.0)
        await lm.engine.close()
        del lm
        gc.collect()  # the Model's mmap goes with its last reference
        log.info("unloaded %s", mid)
        self.metrics.models_loaded.set(len(self.loaded))
        self.update_gauges()
        if self.on_change is not None:
            self.on_change()
        return True

    async def reap(self, period_s: float = 1.0) -> None:
        """Unload models whose keep-alive has run out (runs for the daemon's life)."""
        while True:
            await asyncio.sleep(period_s)
            now = time.time()
            for lm in list(self.loaded.values()):
                if not lm.busy and lm.expires_at is not None and now >= lm.expires_at:
                    log.info("%s idle for its keep_alive (%.0fs)", lm.id, lm.keep_alive_s or 0)
                    await self.unload(lm.id)

    async def close(self, grace_s: float) -> int:
        """Stop loads under way, drain every model (in parallel, `grace_s` for all),
        stop the engines; returns how many requests were aborted."""
        for fut in [*self._loading.values(), *self._warming]:
            fut.cancel()  # (a vocabulary already being built finishes on its thread)
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        engines = [lm.engine for lm in self.loaded.values()]
        n = sum(await asyncio.gather(*(e.drain(grace_s) for e in engines)))
        for e in engines:
            await e.close()
        self.loaded.clear()
        return n

    @property
    def n_active(self) -> int:
        return sum(m.engine.n_active for m in self.loaded.values())

    def update_gauges(self) -> None:
        """Each loaded model's scheduler gauges and counts."""
        self.metrics.set_engine_gauges([(mid, lm.engine.stats()) for mid, lm in list(self.loaded.items())])

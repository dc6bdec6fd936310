"""Pulls by name from the registries people use, into the store (edgelm.store).

Ollama's registry speaks the OCI distribution protocol:

    GET {registry}/v2/{namespace}/{model}/manifests/{tag}
        Accept: application/vnd.docker.distribution.manifest.v2+json
        → {"config": {digest, size}, "layers": [{"mediaType", "digest", "size"}, ...]}
    GET {registry}/v2/{namespace}/{model}/blobs/{digest}
        → the bytes, usually by a redirect to a storage host (Range requests work)

The layers: `application/vnd.ollama.image.model` (the GGUF), `.template` (a Go
template), `.params` (JSON: stop strings and sampling defaults), `.system`, `.license`,
`.messages`; `.projector` (a vision encoder) is left out, since edgelm runs text only,
and a model with an `.adapter` (LoRA) is refused.

Hugging Face (`hf.co/{user}/{repo}[:{quant}]`), through the Hub's HTTP API:

    GET {hf}/api/models/{user}/{repo}/tree/main?recursive=true
        → [{"type": "file", "path", "size", "lfs": {"oid": sha256, "size"}}, ...]
        (pages follow the Link header's rel="next")
    GET {hf}/{user}/{repo}/resolve/main/{path}   → a redirect to the storage host

The quant picks the GGUF whose name carries it (`Qwen3-0.6B-Q4_K_M.gguf`), ignoring
case; without one, Q4_K_M if the repo has it, else the first of PREFERRED it has, as
Hugging Face's own Ollama endpoint does. A model split in parts
(`...-00001-of-00003.gguf`) is downloaded part by part and merged into one GGUF
(edgelm.gguf_split). Vision projectors (`mmproj-*`) are not model files.

Every blob is downloaded into `blobs/sha256-<hex>-partial` (resumed with Range from
what is there), checked against its digest, the model also loaded as edgelm loads a
model, and only then renamed into place; the manifest is written last. A dropped
connection or a 5xx is retried (RETRIES times, backing off from BACKOFF_S, doubling);
a digest mismatch after a resumed download is retried once from the start (the partial
may have been bad), after a whole one it is an error. A lock file per blob keeps two
pulls from writing it at once. Registry base URLs come from the daemon's config
(`registry_url`, `hf_url`) or `$EDGELM_REGISTRY_URL`, `$EDGELM_HF_URL` (a mirror, or a test
server); `$HF_TOKEN` goes to Hugging Face for gated repos (never to the storage hosts
it redirects to).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from edgelm import __version__, store
from edgelm.pull import MAX_REDIRECTS, Progress, PullError, _check_room, _fetch, _open_url, validated
from edgelm.store import ModelName, Store

RETRIES = 4
BACKOFF_S = 0.5
PREFERRED = (
    "Q4_K_M",
    "Q4_K_S",
    "Q5_K_M",
    "Q4_0",
    "Q5_K_S",
    "Q6_K",
    "Q8_0",
    "Q3_K_M",
    "Q3_K_L",
    "Q2_K",
    "IQ4_XS",
    "Q5_0",
    "Q4_1",
    "Q5_1",
    "F16",
    "BF16",
    "F32",
)
_QUANT = re.compile(r"(?:^|[-_.])((?:I?Q[0-9]_?[A-Z0-9_]*?)|BF16|F16|F32)(?=$|[-.])", re.IGNORECASE)
_SPLIT = re.compile(r"^(.*)-([0-9]{5})-of-([0-9]{5})\.gguf$")
MAX_LISTING = 100_000
"""Most files a Hugging Face repo listing may have."""


@dataclass(frozen=True)
class Registries:
    ollama: str = "https://registry.ollama.ai"
    hf: str = "https://huggingface.co"

    @classmethod
    def from_env(cls, ollama: str | None = None, hf: str | None = None) -> Registries:
        return cls(
            (ollama or os.environ.get("EDGELM_REGISTRY_URL") or cls.ollama).rstrip("/"),
            (hf or os.environ.get("EDGELM_HF_URL") or cls.hf).rstrip("/"),
        )


@dataclass
class Layer:
    """A blob to fetch: where from, its digest and size, and what it is."""

    media_type: str
    digest: str
    size: int
    urls: list[str]  # one, or the parts of a split GGUF (then `part_digests` are theirs)
    part_digests: list[str] = field(default_factory=list)
    part_sizes: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """What a name pulls: its layers and the manifest to write."""

    name: ModelName
    layers: list[Layer]
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"User-Agent": f"edgelm/{__version__}", **(extra or {})}


def _not_found(name: ModelName, where: str) -> PullError:
    if name.is_hf:
        return PullError(
            f"model '{name}' not found on Hugging Face ({where}): check the user/repo (it may be private "
            "or gated: set HF_TOKEN) and the quantization tag",
            404,
        )
    return PullError(
        f"model '{name}' not found in the registry ({where}): check the name and tag (ollama.com/library lists them)",
        404,
    )


async def _get_json(
    s: Any, url: str, name: ModelName, headers: dict[str, str], limit: int = 8 << 20
) -> tuple[Any, Any]:
    """A JSON document and its response headers; PullError for a missing name, an
    unreachable registry or an answer that is not JSON."""
    import aiohttp

    host = url.split("/")[2] if "//" in url else url
    try:
        r = await _open_url(s, url, headers)
    except PullError as e:
        raise PullError(
            f"could not reach {host} to pull '{name}': check the network, or the registry URL "
            "(registry_url / hf_url, $EDGELM_REGISTRY_URL / $EDGELM_HF_URL)",
            502,
            e.detail,
            True,
        ) from None
    try:
        if r.status in (401, 403, 404):
            raise _not_found(name, host)
        if r.status != 200:
            raise PullError(
                f"{host} answered the pull of '{name}' with an error; try again later",
                502,
                f"{url}: HTTP {r.status}",
                r.status >= 500 or r.status == 429,
            )
        try:
            raw = await r.content.read(limit + 1)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise PullError(f"{host} broke off while sending the manifest of '{name}'", 502, str(e), True) from None
        if len(raw) > limit:
            raise PullError(f"{host} sent a manifest or listing larger than {limit >> 20} MiB for '{name}'", 502, url)
        try:
            return json.loads(raw), r.headers
        except ValueError:
            raise PullError(
                f"{host} did not answer with JSON for '{name}' (is the registry URL right?)", 502, url
            ) from None
    finally:
        r.release()


async def _retrying(what: Callable[[], Any], report: Progress, label: str, retries: int, backoff_s: float) -> Any:
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return await what()
        except PullError as e:
            if not e.retry or attempt == retries:
                raise
            report({"status": f"retrying {label} in {delay:.1f} s ({attempt + 1} of {retries})"})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


# -- what a name pulls -----------------------------------------------------------------


async def plan_ollama(s: Any, name: ModelName, base: str, headers: dict[str, str]) -> Plan:
    ns, model = quote(name.namespace, safe=""), quote(name.model, safe="")
    url = f"{base}/v2/{ns}/{model}/manifests/{quote(name.tag, safe='')}"
    manifest, _ = await _get_json(s, url, name, _headers({**headers, "Accept": store.MANIFEST_TYPE}))
    try:
        store.check_manifest(manifest)
    except store.StoreError as e:
        raise PullError(f"the registry's manifest for '{name}' is not usable: {e}", 502, url) from None
    notes = []
    keep = []
    for layer in manifest["layers"]:
        mt = layer["mediaType"]
        if mt == store.ADAPTER:
            raise PullError(f"'{name}' applies an adapter (LoRA) to its model, which edgelm does not run", 422)
        if mt == store.PROJECTOR:
            notes.append("skipping the vision projector (edgelm runs text only)")
            continue
        if mt != store.MODEL and mt not in store.TEXT_LAYERS and not mt.startswith("application/vnd.ollama.image."):
            raise PullError(f"'{name}' has a layer of type {mt[:80]!r}, which edgelm does not know", 422)
        keep.append(layer)
    manifest = {**manifest, "layers": keep}
    layers = []
    for layer in ([manifest["config"]] if isinstance(manifest.get("config"), dict) else []) + keep:
        d = layer["digest"]
        layers.append(Layer(layer["mediaType"], d, int(layer.get("size", 0)), [f"{base}/v2/{ns}/{model}/blobs/{d}"]))
    return Plan(name, layers, manifest, notes)


def quant_of(file: str) -> str | None:
    """The quantization label in a GGUF file name ("Qwen3-0.6B-Q4_K_M.gguf" → "Q4_K_M")."""
    stem = _SPLIT.sub(r"\1", file)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    found = _QUANT.findall(stem.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


def pick_gguf(files: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The listing entries of the GGUF a tag asks for (several: a split model, in
    order), or PullError naming the quantizations the repo has."""
    ggufs = [
        f
        for f in files
        if str(f.get("path", "")).lower().endswith(".gguf")
        and "mmproj" not in str(f["path"]).rsplit("/", 1)[-1].lower()
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in ggufs:
        m = _SPLIT.match(str(f["path"]))
        groups.setdefault(m.group(1) if m else str(f["path"]), []).append(f)
    by_quant: dict[str, list[str]] = {}
    for key, parts in groups.items():
        q = quant_of(str(parts[0]["path"]))
        by_quant.setdefault(q or "", []).append(key)
    if not groups:
        raise PullError("the repository has no GGUF file", 404)
    want = tag.upper()
    if want == "LATEST":
        choice = next((q for q in PREFERRED if q in by_quant), None) or sorted(by_quant)[0]
    else:
        found = next((q for q in by_quant if q == want), None)
        if found is None:
            exact = [k for k in groups if Path(k).name.lower() in (tag.lower(), tag.lower() + ".gguf")]
            if not exact:
                have = ", ".join(sorted(q for q in by_quant if q)) or "none named by quantization"
                raise PullError(f"the repository has no {tag} GGUF (it has: {have})", 404)
            return _ordered(groups[exact[0]])
        choice = found
    return _ordered(groups[sorted(by_quant[choice])[0]])


def _ordered(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(parts) == 1 and not _SPLIT.match(str(parts[0]["path"])):
        return parts
    parts = sorted(parts, key=lambda f: str(f["path"]))
    counts = {_SPLIT.match(str(f["path"])).group(3) for f in parts}  # type: ignore[union-attr]
    n = int(next(iter(counts)))
    if len(counts) != 1 or [int(_SPLIT.match(str(f["path"])).group(2)) for f in parts] != list(range(1, n + 1)):  # type: ignore[union-attr]
        raise PullError(f"the repository's split GGUF {parts[0]['path']} is missing parts", 502)
    return parts


async def plan_hf(s: Any, name: ModelName, base: str, headers: dict[str, str]) -> Plan:
    repo = f"{quote(name.namespace, safe='')}/{quote(name.model, safe='')}"
    url: str | None = f"{base}/api/models/{repo}/tree/main?recursive=true"
    files: list[dict[str, Any]] = []
    while url and len(files) < MAX_LISTING:
        page, hdrs = await _get_json(s, url, name, _headers(headers))
        if not isinstance(page, list):
            raise PullError(f"Hugging Face's file listing for '{name}' is not a list", 502, url)
        files += [
            f
            for f in page
            if isinstance(f, dict) and f.get("type", "file") == "file" and isinstance(f.get("path"), str)
        ]
        nxt = re.search(r'<([^>]+)>;\s*rel="next"', hdrs.get("Link", ""))
        url = nxt.group(1) if nxt else None
        if url is not None and urlparse(url).netloc != urlparse(base).netloc:
            raise PullError(
                "Hugging Face's file listing continues on another host; edgelm does not follow it", 502, url
            )
    try:
        chosen = pick_gguf(files, name.tag)
    except PullError as e:
        raise PullError(f"hf.co/{name.namespace}/{name.model}: {e}", e.status) from None
    digests, sizes, urls = [], [], []
    for f in chosen:
        lfs: dict[str, Any] = f["lfs"] if isinstance(f.get("lfs"), dict) else {}
        oid = str(lfs.get("oid") or lfs.get("sha256") or "")
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise PullError(f"Hugging Face gives no sha256 for {f['path']}; edgelm pulls only checked files", 502)
        digests.append("sha256:" + oid)
        sizes.append(int(lfs.get("size") or f.get("size") or 0))
        urls.append(f"{base}/{repo}/resolve/main/{quote(str(f['path']))}")
    notes = [f"{name}: {', '.join(str(f['path']) for f in chosen)}"]
    if len(chosen) == 1:
        layer = Layer(store.MODEL, digests[0], sizes[0], urls)
    else:  # the merged file's digest is known once it is merged
        layer = Layer(store.MODEL, "", sum(sizes), urls, digests, sizes)
        notes.append(f"joining {len(chosen)} parts into one GGUF")
    manifest = {"schemaVersion": 2, "mediaType": store.MANIFEST_TYPE, "layers": []}
    return Plan(name, [layer], manifest, notes)


# -- fetching --------------------------------------------------------------------------


async def _fetch_blob(
    s: Any,
    st: Store,
    layer: Layer,
    report: Progress,
    headers: dict[str, str],
    max_bytes: int | None,
    retries: int,
    backoff_s: float,
) -> None:
    """One blob into the store: downloaded, checked (digest; a model also loaded), renamed."""
    dest = st.blob(layer.digest)
    part = dest.with_name(dest.name + "-partial")
    short = layer.digest.split(":")[1][:12]
    fields = {"digest": layer.digest, "total": layer.size}
    small = layer.media_type in store.TEXT_LAYERS or layer.media_type == store.CONFIG_TYPE
    limit = store.MAX_TEXT_LAYER if small else max_bytes
    if layer.size and limit is not None and layer.size > limit:
        raise PullError(
            f"the model file is {layer.size / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB this "
            "pull may take (max_pull_mib)",
            413,
        )
    async with store.file_lock(
        dest.with_name("." + dest.name + ".lock"), lambda: report({"status": f"waiting for another pull of {short}"})
    ):
        if st.has_blob(layer.digest, layer.size or None):
            report({"status": f"pulling {short}", "completed": layer.size, **fields})
            return
        if layer.size:
            _check_room(st.blobs, layer.size - (part.stat().st_size if part.exists() else 0), short)
        for fresh in (False, True):
            resumed = part.exists() and part.stat().st_size > 0

            async def once() -> str:
                got, _ = await _fetch(
                    s, layer.urls[0], part, short, report, _headers(headers), limit, f"pulling {short}", fields
                )
                return got

            got = await _retrying(once, report, short, retries, backoff_s)
            if "sha256:" + got == layer.digest:
                break
            part.unlink(missing_ok=True)
            if fresh or not resumed:
                raise PullError(
                    f"the download of {short} does not match its digest {layer.digest} (got sha256:{got}); "
                    "the source sent other bytes than its manifest names. Pull again later",
                    502,
                )
            report({"status": f"{short} did not match its digest after resuming; downloading it again"})
        report({"status": "verifying sha256 digest", "digest": layer.digest})
        if layer.media_type == store.MODEL:
            await validated(part, report)
        os.replace(part, dest)


async def _fetch_split(
    s: Any,
    st: Store,
    layer: Layer,
    report: Progress,
    headers: dict[str, str],
    max_bytes: int | None,
    retries: int,
    backoff_s: float,
) -> str:
    """A split GGUF: its parts as blobs of their own (kept until merged), merged into
    one model blob; returns the merged file's digest."""
    from edgelm.gguf_split import SplitError, merge

    loop = asyncio.get_running_loop()
    if max_bytes is not None and layer.size > max_bytes:
        raise PullError(
            f"the model is {layer.size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB this "
            "pull may take (max_pull_mib)",
            413,
        )
    _check_room(st.blobs, 2 * layer.size, "the parts and the merged model")
    parts = []
    for i, (url, d, size) in enumerate(zip(layer.urls, layer.part_digests, layer.part_sizes)):
        piece = Layer("application/vnd.edgelm.gguf-part", d, size, [url])
        report({"status": f"part {i + 1} of {len(layer.urls)}"})
        await _fetch_blob(s, st, piece, report, headers, max_bytes, retries, backoff_s)
        parts.append(st.blob(d))
    report({"status": f"joining {len(parts)} parts into one GGUF"})
    tmp = st.blobs / f".merge-{os.getpid()}-{id(layer)}-partial"
    try:
        try:
            digest = await loop.run_in_executor(None, merge, parts, tmp)
        except SplitError as e:
            raise PullError(f"the parts of the split model do not join: {e}", 502) from None
        dest = st.blob(digest)
        await validated(tmp, report)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    for d in layer.part_digests:  # the parts are not named by any manifest
        st.blob(d).unlink(missing_ok=True)
    layer.digest, layer.size = digest, dest.stat().st_size
    return digest


async def pull_name(
    name: ModelName,
    models_dir: Path,
    progress: Progress | None = None,
    *,
    registries: Registries | None = None,
    max_bytes: int | None = None,
    in_use: Callable[[Path], bool] | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
) -> store.Entry:
    """Pull `name` into the store in `models_dir` (see the module doc); its entry."""
    import aiohttp

    report = progress or (lambda _: None)
    reg = registries or Registries.from_env()
    st = Store(models_dir)
    st.blobs.mkdir(parents=True, exist_ok=True)
    old = st.lookup(str(name))
    report({"status": "pulling manifest"})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    hf_headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    async with aiohttp.ClientSession(timeout=timeout) as s:
        if name.is_hf:
            plan = await _retrying(
                lambda: plan_hf(s, name, reg.hf, hf_headers), report, "the listing", retries, backoff_s
            )
            headers = hf_headers
        else:
            base = reg.ollama if name.registry_default else f"https://{name.host}"
            plan = await _retrying(lambda: plan_ollama(s, name, base, {}), report, "the manifest", retries, backoff_s)
            headers = {}
        for note in plan.notes:
            report({"status": note})
        model = next(x for x in plan.layers if x.media_type == store.MODEL)
        if old is not None and in_use is not None and in_use(old.model) and model.digest != old.digest:
            raise PullError(
                f"'{name}' is loaded and in use; a pull never replaces a model in use. Unload it first "
                "(`edgelm stop`, or a request with keep_alive 0), then pull again",
                409,
            )
        for layer in plan.layers:
            if layer.part_digests:
                await _fetch_split(s, st, layer, report, headers, max_bytes, retries, backoff_s)
            else:
                await _fetch_blob(s, st, layer, report, headers, max_bytes, retries, backoff_s)
    manifest = plan.manifest
    if not manifest["layers"]:  # Hugging Face: the manifest is ours
        manifest = {**manifest, "layers": [{"mediaType": store.MODEL, "digest": model.digest, "size": model.size}]}
    report({"status": "writing manifest"})
    loop = asyncio.get_running_loop()
    try:
        entry = await loop.run_in_executor(None, st.put, str(name), manifest, in_use or (lambda _: False))
    except store.StoreError as e:
        raise PullError(str(e), e.status) from None
    report({"status": "success", "path": str(entry.model)})
    return entry


__all__ = ["Registries", "pull_name", "pick_gguf", "quant_of", "MAX_REDIRECTS"]

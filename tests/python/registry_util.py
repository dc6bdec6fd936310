"""Loopback servers that speak the registries' protocols, serving real files: the Ollama
registry (OCI distribution: manifests by name and tag, blobs by digest, each blob a
redirect to a separate blob host, as registry.ollama.ai redirects to its storage) and
Hugging Face (the Hub's tree listing, paged, and `resolve` downloads redirected to the
blob host). The blob host answers Range requests, and its misbehaviours are per digest:
drop the connection part way (the first `drops` times), or send other bytes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from test_pull import http_server

MODEL = "application/vnd.ollama.image.model"


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return "sha256:" + h.hexdigest()


@dataclass
class Blobs:
    """What the blob host serves, by digest, and what it has been asked."""

    files: dict[str, Path] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)  # digest → connections still to drop
    wrong: set[str] = field(default_factory=set)  # digests answered with other bytes
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (digest, Range header)

    def add_file(self, p: Path) -> tuple[str, int]:
        d = sha256_file(p)
        self.files[d] = p
        return d, p.stat().st_size

    def add_bytes(self, b: bytes) -> tuple[str, int]:
        d = "sha256:" + hashlib.sha256(b).hexdigest()
        self.data[d] = b
        return d, len(b)


def _blob_host(blobs: Blobs) -> Any:
    from aiohttp import web

    async def blob(request: web.Request) -> web.StreamResponse:
        d = request.match_info["digest"]
        blobs.requests.append((d, request.headers.get("Range")))
        if d in blobs.wrong:
            size = blobs.files[d].stat().st_size if d in blobs.files else len(blobs.data[d])
            return web.Response(body=b"GGUF" + bytes(size - 4))  # the right length, other bytes
        if blobs.drops.get(d, 0) > 0:
            blobs.drops[d] -= 1
            start = int(request.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
            data = blobs.files[d].read_bytes() if d in blobs.files else blobs.data[d]
            resp = web.StreamResponse(status=206 if start else 200, headers={"Content-Length": str(len(data) - start)})
            await resp.prepare(request)
            await resp.write(data[start : start + (len(data) - start) // 3])
            assert request.transport is not None
            request.transport.close()  # the storage host goes away a third of the way in
            return resp
        if d in blobs.files:
            return web.FileResponse(blobs.files[d])
        if d in blobs.data:
            return web.Response(body=blobs.data[d])
        return web.Response(status=404)

    def setup(app: Any) -> None:
        app.router.add_get("/blobs/{digest}", blob)

    return setup


@dataclass
class Registry:
    """The servers' base URLs and what they serve."""

    ollama: str
    hf: str
    blob_host: str
    blobs: Blobs
    manifests: dict[tuple[str, str, str], dict[str, Any]]
    repos: dict[tuple[str, str], list[dict[str, Any]]]

    def add_ollama(
        self,
        name: str,
        model: Path,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        system: str | None = None,
        license: str | None = None,
        extra: list[dict[str, Any]] | None = None,
        digest: str | None = None,
        size: int | None = None,
    ) -> dict[str, Any]:
        """Publish `model` (a GGUF) as `[namespace/]model:tag` with the text layers given;
        `digest` and `size` override the model layer's (a manifest that lies)."""
        ns, rest = name.split("/", 1) if "/" in name else ("library", name)
        model_name, tag = rest.split(":", 1) if ":" in rest else (rest, "latest")
        d, real = self.blobs.add_file(model)
        if digest is not None:
            self.blobs.files[digest] = model  # served under the digest the manifest names
        layers = [{"mediaType": MODEL, "digest": digest or d, "size": size if size is not None else real}]
        for mt, text in (
            ("template", template),
            ("system", system),
            ("license", license),
            ("params", json.dumps(params) if params is not None else None),
        ):
            if text is not None:
                ld, ls = self.blobs.add_bytes(text.encode())
                layers.append({"mediaType": f"application/vnd.ollama.image.{mt}", "digest": ld, "size": ls})
        layers += extra or []
        cd, cs = self.blobs.add_bytes(json.dumps({"model_format": "gguf", "model_family": "llama"}).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cd, "size": cs},
            "layers": layers,
        }
        self.manifests[(ns, model_name, tag)] = manifest
        return manifest

    def add_hf(self, repo: str, files: dict[str, Path], extra_files: list[str] = ()) -> None:  # type: ignore[assignment]
        """Publish files in a Hugging Face repo (GGUFs by path; `extra_files`: others)."""
        user, name = repo.split("/")
        listing: list[dict[str, Any]] = [{"type": "file", "path": p, "size": 10, "oid": "0" * 40} for p in extra_files]
        for path, f in files.items():
            d, size = self.blobs.add_file(f)
            listing.append(
                {
                    "type": "file",
                    "path": path,
                    "size": size,
                    "oid": "1" * 40,
                    "lfs": {"oid": d.split(":")[1], "size": size, "pointerSize": 134},
                }
            )
        self.repos[(user, name)] = listing


@contextmanager
def registry_servers(page_size: int = 2) -> Iterator[Registry]:
    """The Ollama registry, Hugging Face and the blob host, each a loopback server."""
    from aiohttp import web

    blobs = Blobs()
    with http_server(_blob_host(blobs)) as blob_url:
        manifests: dict[tuple[str, str, str], dict[str, Any]] = {}
        repos: dict[tuple[str, str], list[dict[str, Any]]] = {}

        async def manifest(request: web.Request) -> web.Response:
            key = (request.match_info["ns"], request.match_info["model"], request.match_info["tag"])
            m = next(
                (v for k, v in manifests.items() if tuple(x.lower() for x in k) == tuple(x.lower() for x in key)), None
            )
            if m is None:
                return web.json_response(
                    {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}, status=404
                )
            return web.json_response(m, content_type="application/vnd.docker.distribution.manifest.v2+json")

        async def blob(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(f"{blob_url}/blobs/{request.match_info['digest']}")

        def ollama_routes(app: Any) -> None:
            app.router.add_get("/v2/{ns}/{model}/manifests/{tag}", manifest)
            app.router.add_get("/v2/{ns}/{model}/blobs/{digest}", blob)

        async def tree(request: web.Request) -> web.Response:
            listing = repos.get((request.match_info["user"], request.match_info["repo"]))
            if listing is None:
                return web.json_response({"error": "Repository not found"}, status=404)
            start = int(request.query.get("cursor", "0"))
            page = listing[start : start + page_size]
            headers = {}
            if start + page_size < len(listing):
                headers["Link"] = (
                    f'<{request.url.with_query(recursive="true", cursor=str(start + page_size))}>; rel="next"'
                )
            return web.json_response(page, headers=headers)

        async def resolve(request: web.Request) -> web.Response:
            listing = repos.get((request.match_info["user"], request.match_info["repo"])) or []
            f = next((x for x in listing if x["path"] == request.match_info["path"] and "lfs" in x), None)
            if f is None:
                return web.Response(status=404, text="Entry not found")
            raise web.HTTPFound(f"{blob_url}/blobs/sha256:{f['lfs']['oid']}")

        def hf_routes(app: Any) -> None:
            app.router.add_get("/api/models/{user}/{repo}/tree/main", tree)
            app.router.add_get("/{user}/{repo}/resolve/main/{path:.+}", resolve)

        with http_server(ollama_routes) as ollama_url, http_server(hf_routes) as hf_url:
            yield Registry(ollama_url, hf_url, blob_url, blobs, manifests, repos)


def split_gguf(src: Path, out_dir: Path, max_bytes: int) -> list[Path]:
    """`src` split into parts of at most `max_bytes` of tensors, as gguf-split writes them
    (gguf-py's writer: the keys in the first part, `split.*` keys in every part)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(out_dir / src.name, arch, split_max_size=max_bytes)
    copy_with_new_metadata(reader, writer, {}, [])
    return sorted(out_dir.glob(src.stem + "-*-of-*.gguf"))

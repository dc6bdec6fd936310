"""Who may call what, and from where: the checks every request passes before its
handler runs (one middleware, `guard`).

1. Host. The Host header must name this daemon: localhost names, a loopback or bind
   address, one of this machine's addresses when bound to all of them, its host name
   (also with `.local`), its mDNS name (`edgelm-<host>.local`), or a name in
   `allowed_hosts`. A web page that makes its own name resolve to the daemon's address
   (DNS rebinding) sends its own name here, and is refused.
2. Origin. Browsers send `Origin` with every cross-site POST, also for a `text/plain`
   body, which needs no preflight. A request that carries an Origin is served only when
   the origin is one of this machine's pages (http(s)://localhost, 127.0.0.1, [::1], any
   port), the daemon's own origin, or in `allowed_origins` ("*": any). Allowed origins
   get CORS headers, and their preflight (OPTIONS) is answered here, before any key is
   asked for. Clients that are not browsers send no Origin and are not affected.
3. Keys. Each route has a scope in ROUTE_SCOPES:
   - open: probes and discovery (`/health`, `/`, `/api/version`);
   - read: inference and listings; need a key when either key is set (either works);
   - admin: what changes what is on disk or in memory (pull, delete, copy, unloading a
     model, and `/metrics`); need the admin key when one is set, else the API key when
     that is set, else nothing.
   A route missing from the table is treated as admin (fail closed); a test checks that
   the table covers every route the application has.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgelm.server.params import ApiError
from edgelm.server.state import SERVER

if TYPE_CHECKING:
    from edgelm.config import Config

log = logging.getLogger("edgelm.serve")

OPEN, READ, ADMIN = "open", "read", "admin"

ROUTE_SCOPES: dict[str, str] = {
    "GET /health": OPEN,
    "GET /": OPEN,
    "GET /api/version": OPEN,
    "GET /openapi.json": READ,
    "GET /v1/models": READ,
    "GET /v1/models/{model}": READ,
    "POST /v1/completions": READ,
    "POST /v1/chat/completions": READ,
    "POST /tokenize": READ,
    "POST /detokenize": READ,
    "GET /api/tags": READ,
    "GET /api/ps": READ,
    "POST /api/show": READ,
    "POST /api/generate": READ,  # the unload form (no prompt, keep_alive 0) asks for ADMIN itself
    "POST /api/chat": READ,  # likewise
    "POST /api/embed": READ,
    "POST /api/embeddings": READ,
    "POST /v1/embeddings": READ,
    "GET /api/edgelm/models": READ,
    "GET /api/edgelm/models/{file}": READ,
    "GET /metrics": ADMIN,
    "POST /api/pull": ADMIN,
    "DELETE /api/delete": ADMIN,
    "POST /api/copy": ADMIN,
}
"""Every route: "METHOD canonical-path" → scope. HEAD takes its GET's scope."""

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgelm"'}
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, Accept, User-Agent, X-Requested-With, OpenAI-Beta, X-Stainless-*"
_ORIGIN_KEY: web.RequestKey[str] = web.RequestKey("cors_origin", str)


def route_key(request: web.Request) -> str:
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    method = "GET" if request.method == "HEAD" else request.method
    return f"{method} {path}"


def scope_of(request: web.Request) -> str:
    return ROUTE_SCOPES.get(route_key(request), ADMIN)


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def check_key(cfg: Config, request: web.Request, scope: str) -> None:
    """Raise 401/403 unless the request's key grants `scope` (see the module doc)."""
    if scope == OPEN or (cfg.api_key is None and cfg.admin_key is None):
        return
    if scope == ADMIN:
        needed = cfg.admin_key if cfg.admin_key is not None else cfg.api_key
    elif cfg.api_key is None:
        return  # only an admin key is set: reading stays open
    else:
        needed = cfg.api_key
    token = _bearer(request)
    if not token:
        raise ApiError(
            "an API key is required: send 'Authorization: Bearer <key>'",
            None,
            401,
            "invalid_api_key",
            "authentication_error",
            _CHALLENGE,
        )

    def matches(key: str | None) -> bool:
        return key is not None and hmac.compare_digest(token.encode(), key.encode())

    if matches(needed) or (scope == READ and matches(cfg.admin_key)):
        return
    if scope == ADMIN and matches(cfg.api_key):
        raise ApiError(
            "this needs the admin key (it changes the models on disk or in memory)",
            None,
            403,
            "insufficient_scope",
            "permission_error",
        )
    raise ApiError("invalid API key", None, 401, "invalid_api_key", "authentication_error", _CHALLENGE)


def require_admin(request: web.Request) -> None:
    """For handlers whose request is an admin action only in some forms (unloading)."""
    check_key(request.app[SERVER].cfg, request, ADMIN)


def mdns_host_name() -> str:
    """The host name the mDNS advertiser announces (see edgelm.daemon.mdns)."""
    return f"edgelm-{socket.gethostname().split('.')[0] or 'edgelm'}.local"


def _split_host(value: str) -> str:
    """The host part of a Host header or an origin's authority, lower-cased."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1 : v.find("]")] if "]" in v else v
    if v.count(":") == 1:
        v = v.split(":", 1)[0]
    return v.rstrip(".")


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """The Host names and addresses this daemon answers to (point 1 of the module doc)."""

    REFRESH_S = 10.0

    def __init__(self, cfg: Config) -> None:
        host = socket.gethostname().lower()
        short = host.split(".")[0]
        self.any = "*" in cfg.allowed_hosts
        self.names = {
            n.lower().rstrip(".") for n in (host, short, f"{short}.local", mdns_host_name(), *cfg.allowed_hosts)
        }
        bind = cfg.host.strip("[]").lower()
        self.names.add(bind)
        self.wildcard = bind in ("0.0.0.0", "::", "")
        self._addrs: set[str] = set()
        self._addrs_at = 0.0

    def _local_addresses(self) -> set[str]:
        """This machine's addresses (bound to all of them; refreshed as DHCP moves them)."""
        now = time.monotonic()
        if now - self._addrs_at > self.REFRESH_S:
            import ifaddr

            addrs = set()
            for adapter in ifaddr.get_adapters():
                for ip in adapter.ips:
                    a = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                    addrs.add(a.split("%")[0].lower())
            self._addrs, self._addrs_at = addrs, now
        return self._addrs

    def allows(self, host_header: str | None) -> bool:
        if self.any or not host_header:
            return True  # no Host: HTTP/1.0 tools, never a browser
        host = _split_host(host_header)
        if host in self.names or _is_loopback_name(host):
            return True
        if not self.wildcard:
            return False
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            return False
        return ip in self._local_addresses()


class OriginPolicy:
    """Which browser origins may call the API (point 2 of the module doc)."""

    def __init__(self, cfg: Config) -> None:
        self.any = "*" in cfg.allowed_origins
        self.allowed = {o.lower().rstrip("/") for o in cfg.allowed_origins}

    def allows(self, origin: str, host_header: str | None, scheme: str) -> bool:
        o = origin.lower().rstrip("/")
        if self.any or o in self.allowed:
            return True
        if "://" not in o:
            return False  # "null" (sandboxed frames, file://) and garbage
        o_scheme, authority = o.split("://", 1)
        if o_scheme in ("http", "https") and _is_loopback_name(_split_host(authority)):
            return True  # a page served by this machine
        return host_header is not None and o == f"{scheme}://{host_header.lower()}"  # same origin


def _cors_headers(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Vary": "Origin",
        "Access-Control-Expose-Headers": "Retry-After, WWW-Authenticate",
    }


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers for allowed origins, on every response
    (streams and errors included)."""
    origin = request.get(_ORIGIN_KEY)
    if origin is not None:
        response.headers.update(_cors_headers(origin))


def make_guard(cfg: Config) -> Any:
    """The middleware (see the module doc)."""
    hosts, origins = HostPolicy(cfg), OriginPolicy(cfg)

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not hosts.allows(host):
            log.warning(
                "refused a request for host %r from %s (not this daemon's name; see allowed_hosts)",
                (host or "")[:100],
                request.remote,
            )
            raise ApiError(
                f"host {(host or '')[:100]!r} is not a name of this server; add it to allowed_hosts "
                "if clients reach the server by it",
                None,
                403,
                "host_not_allowed",
                "permission_error",
            )
        origin = request.headers.get("Origin")
        if origin is not None:
            if not origins.allows(origin, host, request.scheme):
                log.warning(
                    "refused a request from origin %r (%s %s); see allowed_origins",
                    origin[:100],
                    request.method,
                    request.path[:100],
                )
                raise ApiError(
                    f"requests from the web page at {origin[:100]!r} are not allowed; add the origin to "
                    "allowed_origins to let it use this server",
                    None,
                    403,
                    "origin_not_allowed",
                    "permission_error",
                )
            request[_ORIGIN_KEY] = origin
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                asked = request.headers.get("Access-Control-Request-Headers")
                return web.Response(
                    status=204,
                    headers={
                        **_cors_headers(origin),
                        "Access-Control-Allow-Methods": _CORS_METHODS,
                        "Access-Control-Allow-Headers": asked[:1000] if asked else _CORS_HEADERS,
                        "Access-Control-Max-Age": "600",
                    },
                )
        if request.match_info.http_exception is None:  # unknown paths and methods: the router's 404/405
            check_key(cfg, request, scope_of(request))
        response: web.StreamResponse = await handler(request)
        return response

    return guard

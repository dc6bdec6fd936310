"""edgelm: LLM inference for edge devices.

    >>> import edgelm
    >>> m = edgelm.Model("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> ids = m.tokenize("The capital of France is")
    >>> for tok in m.generate(ids, max_tokens=8, temperature=0):
    ...     print(tok.text, end="")

Errors raised by this package all derive from :class:`EdgelmError`.
"""

from edgelm._native import (
    CacheFullError,
    EdgelmError,
    GGUFFormatError,
    InvalidRequestError,
    ModelLoadError,
    OutputError,
    SamplingParams,
    TokenizerError,
)
from edgelm._native import __version__ as __version__
from edgelm.model import Model, Token


def discover(timeout: float = 3.0, interfaces: list[str] | None = None) -> list[dict[str, object]]:
    """edgelm daemons on the LAN (mDNS): name, url, host, addresses, port, and the TXT
    fields (id, ver, api, path, model, state, auth, accel)."""
    from edgelm.daemon.mdns import discover as _discover

    return _discover(timeout, interfaces)


__all__ = [
    "CacheFullError",
    "EdgelmError",
    "GGUFFormatError",
    "InvalidRequestError",
    "Model",
    "ModelLoadError",
    "OutputError",
    "SamplingParams",
    "Token",
    "TokenizerError",
    "discover",
]

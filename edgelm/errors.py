"""Why a request cannot be served, in the engine's words. The engine and the model pool
raise these; the HTTP layer answers each with its status, in one place
(`edgelm.server.params.ApiError.of`). Each says what failed (`message`), which request
field it concerns (`param`, as the client wrote it) and a short machine-readable
`code`; the class says whether the caller can recover and when:

    RequestError
    ├── BadRequest      the request is wrong: change it (also a ValueError)
    ├── NotFound        no such model: pull it, or name another
    ├── Busy            the queue is full: retry in `retry_after_s`
    └── NoMemory        the model does not fit next to the busy ones: retry when they are idle
"""

from __future__ import annotations


class RequestError(Exception):
    retry_after_s: float | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequest(RequestError, ValueError):
    pass


class NotFound(RequestError):
    pass


class Busy(RequestError):
    retry_after_s = 1.0


class NoMemory(RequestError):
    retry_after_s = 5.0

"""Errors of the HTTP port: the wire protocol's typed error, as an HTTP status.

Every refusal is a JSON body ``{"error": NAME, "code": N, "message": ..., "retriable": bool}``
where NAME and N are the error's entry in protocol/errors.py (the same name a TCP client
gets: ``PERMISSION_DENIED``, ``INVALID_SUBJECT``, ...). docs/HTTP.md has the table.
"""

from __future__ import annotations

from typing import Final

from starlette.responses import JSONResponse

from tidings.protocol.errors import ErrorCode, describe

#: Seconds a client is told to wait (Retry-After) before retrying a retriable refusal.
RETRY_AFTER: Final = 1

#: HTTP status of each error code; a code missing here answers 503 if retriable, else 400.
STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.INVALID_SUBJECT: 400,
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.PROTOCOL_ERROR: 400,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.NO_RESPONDERS: 404,
    ErrorCode.NO_ROUTE: 404,
    ErrorCode.SCHEMA_VIOLATION: 422,
    ErrorCode.TIMEOUT: 408,
    ErrorCode.LIMIT_EXCEEDED: 413,
    ErrorCode.CONFLICT: 409,
    ErrorCode.QUEUE_FULL: 503,
    ErrorCode.STORAGE_FULL: 503,
    ErrorCode.STORAGE_ERROR: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.INTERNAL: 500,
}


class HttpError(Exception):
    """A refusal with its typed error; ``status`` defaults from the code (STATUS)."""

    def __init__(self, code: ErrorCode, message: str, *, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        info = describe(code)
        self.retriable = info.retriable
        self.status = status if status is not None else STATUS.get(code, 503 if info.retriable else 400)
        self.headers = dict(headers or {})
        if self.status == 503 and self.retriable:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER))
        if self.status == 401:
            self.headers.setdefault("WWW-Authenticate", 'Bearer realm="tidings", Basic realm="tidings"')

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.code.name, "code": int(self.code), "message": self.message,
                             "retriable": self.retriable},
                            status_code=self.status, headers={"Cache-Control": "no-store", **self.headers})

"""Every error as JSON `{"error": "one line"}` with its status; no traceback ever reaches a client.

400 a parameter that cannot be acted on, 401 no or a wrong token, 404 an unknown index, item or
route (and a bundle that holds nothing of the kind asked for), 413 an upload over the limits,
415 an upload that is not an image, 422 a request that does not validate, 503 a model that
cannot be loaded. Anything unexpected is logged with its traceback and answered 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors as sk
from .safety import AuthError, NotAnImage, UploadTooLarge

LOG = logging.getLogger(__name__)

#: library errors -> status; the first match in order wins (subclasses first)
STATUS: list[tuple[type[BaseException], int]] = [
    (AuthError, 401),
    (UploadTooLarge, 413),
    (NotAnImage, 415),
    (sk.DecodeError, 415),
    (sk.InputError, 415),
    (sk.IndexNotFoundError, 404),
    (sk.EmptyIndexError, 404),
    (sk.UsageError, 400),
    (sk.ModelUnavailableError, 503),
    (sk.MissingDependencyError, 503),
    (sk.IndexBusyError, 503),
]


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path", "form"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"not found: {request.url.path}"
        return error_response(exc.status_code, detail, getattr(exc, "headers", None))

    async def _known(request: Request, exc: Exception):
        for cls, status in STATUS:
            if isinstance(exc, cls):
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return error_response(status, str(exc), headers)
        LOG.error("%s: %s", request.url.path, exc)  # a damaged bundle, say: not the client's fault
        return error_response(500, str(exc))

    app.add_exception_handler(sk.SearchkitError, _known)
    app.add_exception_handler(AuthError, _known)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        LOG.exception("unexpected error answering %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")

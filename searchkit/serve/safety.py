"""What keeps the server safe by construction: bearer tokens, the upload cap, and serving only
the files that were indexed.

- A file is reached only through an item id looked up in meta.db; no request carries a path.
  It is opened without following a symlink in its last component and served only while it is
  the regular file that was indexed (same size and modification time as its row), so a
  symlink or a swapped folder placed under an indexed folder after the fact reaches nothing.
- A request body larger than the cap is refused with 413 from its Content-Length before any of
  it is read, or, when it comes without one, as soon as the bytes received pass the cap.
- Uploaded images are decoded in memory by the same code as indexing (the same
  decompression-bomb limit) and never written into the bundle or an indexed folder.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
from typing import Any

from ..errors import DecodeError, InputError
from .bundles import ItemNotFound


class AuthError(Exception):
    """No or a wrong bearer token (401)."""


class UploadTooLarge(InputError):
    """A request body or an image over the limits (413)."""


class NotAnImage(InputError):
    """An upload that is not a readable image (415)."""


def check_token(expected: str | None, authorization: str | None) -> None:
    """Raise AuthError unless `authorization` is `Bearer <expected>` (no token: open)."""
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise AuthError("missing or wrong token: send 'Authorization: Bearer TOKEN'" if authorization else "this server needs a token: send 'Authorization: Bearer TOKEN'")


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 without being read past it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _json(send, 400, "bad Content-Length header")
            if declared > self.max_bytes:
                return await _json(send, 413, self._message())
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    raise UploadTooLarge(self._message())
            return message

        async def guarded_send(message):
            if state["over"]:  # whatever the app made of the aborted body, the answer is 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await _json(send, 413, self._message())
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except UploadTooLarge:
            if not state["started"]:
                await _json(send, 413, self._message())

    def _message(self) -> str:
        from ..vectors import format_bytes

        return f"request body too large: the limit is {format_bytes(self.max_bytes)} (searchkit serve --max-upload)"


async def _json(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def open_item_file(row: dict[str, Any]) -> tuple[int, os.stat_result]:
    """An open descriptor and its stat for an image item's file, or ItemNotFound. The caller
    closes the descriptor."""
    if row["kind"] != "image":
        raise ItemNotFound(f"item {row['id']} is a text item; it has no image file")
    try:
        fd = os.open(row["path"], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise ItemNotFound(f"the file of item {row['id']} cannot be opened (gone, a symlink, or unreadable)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
        os.close(fd)
        raise ItemNotFound(f"the file of item {row['id']} changed since it was indexed; re-run `searchkit index`")
    return fd, st


def read_fd(fd: int, size: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read(size + 1)


def decode_upload(data: bytes, draft_size: int = 512):
    """An uploaded image as RGB PIL (JPEG draft-decoded to at least `draft_size`), or
    NotAnImage / UploadTooLarge (more pixels than indexing accepts)."""
    from ..images import decode_image

    if not data:
        raise NotAnImage("the uploaded file is empty")
    try:
        return decode_image(data, draft_size=draft_size)
    except DecodeError as e:
        if str(e).startswith("decompression bomb"):
            raise UploadTooLarge(f"image refused: {e}") from None
        raise NotAnImage(f"the upload is not a readable image: {e}") from None

"""ASGI middleware around the model server: a payload limit, gzip/deflate request bodies, one log line per
request. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time
import zlib

log = logging.getLogger("jointdistill.serving.server")  # the server's one logger


class PayloadLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 400 and is never held in memory."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive)
            return await self._refuse(send, int(length))
        # No Content-Length (chunked): count what arrives. Past the limit the app is handed an empty end of body
        # (frameworks catch errors raised while they read one) and whatever it answers is replaced by our 400.
        seen, over, answered = 0, None, False

        async def counted():
            nonlocal seen, over
            if over is not None:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = (seen, message.get("more_body", False))
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded(message):
            nonlocal answered
            if over is None:
                return await send(message)
            if message["type"] == "http.response.start" and not answered:
                answered = True
                size, more = over
                if more:  # after the last chunk, receive() would wait for the client to hang up
                    await self._drain(receive)
                await self._refuse(send, size)

        await self.app(scope, counted, guarded)
        if over is not None and not answered:
            await self._refuse(send, over[0])

    async def _drain(self, receive, cap: int = 1 << 30) -> None:
        """Read (and drop, chunk by chunk) what the client is still sending, so that it gets to read our 400
        instead of a connection reset; past ``cap`` bytes the connection is simply closed after the answer."""
        dropped = 0
        while dropped < cap:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _refuse(self, send, size: int) -> None:
        import json

        body = json.dumps(
            {
                "error": f"payload of {size} bytes is over the server's limit of {self.limit} bytes "
                "(serve --max-payload-mb); send fewer or smaller images per request"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _NoClientErrors(logging.Filter):
    """KServe logs a bad request (400) or an unknown model (404) with its traceback; `RequestLog` already says
    what the client got wrong, in the request's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kserve.errors import InvalidInput, ModelNotFound

        return not (record.exc_info and isinstance(record.exc_info[1], (InvalidInput, ModelNotFound)))


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, milliseconds; for a 4xx, the message the
    client got). It replaces uvicorn's access line and KServe's latency lines."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, body = time.perf_counter(), 500, b""

        async def sending(message):
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(body) < 4096:
                body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            line = f"{scope.get('method')} {scope.get('path')} {status} {1000 * (time.perf_counter() - t0):.1f} ms"
            if 400 <= status < 500:
                try:
                    import json

                    line += f": {json.loads(body)['error']}"
                except (ValueError, KeyError, TypeError):
                    pass
            log.log(logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR, line)


class Decompress:
    """ASGI middleware: a request body sent with ``Content-Encoding: gzip`` or ``deflate`` (tritonclient's
    ``request_compression_algorithm``) is decompressed before anything reads it, within ``limit`` bytes; another
    encoding gets 400 naming it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if encoding in ("", "identity"):
            return await self.app(scope, receive, send)
        if encoding not in ("gzip", "deflate"):
            return await _answer(
                send,
                400,
                f"Content-Encoding {encoding!r} is not supported (send gzip, deflate or an uncompressed body)",
            )
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        # gzip: a gzip header; deflate: zlib-wrapped (RFC 9110), or raw deflate from clients that send that.
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        data = b"".join(chunks)
        try:
            body = _inflate(data, wbits, self.limit)
        except zlib.error:
            try:
                body = _inflate(data, -zlib.MAX_WBITS, self.limit) if encoding == "deflate" else None
            except zlib.error:
                body = None
            if body is None:
                return await _answer(send, 400, f"the request body is not valid {encoding} data")
        if len(body) > self.limit:
            return await _answer(
                send,
                400,
                f"the decompressed request is over the server's limit of {self.limit} bytes (serve --max-payload-mb)",
            )
        kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def inflated():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, inflated, send)


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress at most ``limit`` + 1 bytes (a small body must not expand without bound)."""
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, limit + 1)
    if not d.eof and len(out) <= limit:
        raise zlib.error("truncated")
    return out


async def _answer(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})

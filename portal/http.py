"""Request bodies: framed as the server hands them over, read within a limit,
decompressed while streaming.

Shared by every endpoint that takes a body (ingest receivers, artifacts, heartbeats).
Content-Encoding gzip, deflate, br and zstd are read; an empty value, `identity` or
`UTF-8` (sent by some Sentry SDKs) mean none.

Framing (`RequestInput`, installed by portal.middleware.RequestBodyMiddleware): a body
with Content-Length is read to that length; a chunked body is read to its end when
the server decodes it and says so (`wsgi.input_terminated`, as gunicorn does), and is
refused with 411 otherwise. Django alone reads a body without Content-Length as empty.
"""

from __future__ import annotations

import functools
import threading
import time
import zlib

import brotli
import zstandard
from django.core.exceptions import BadRequest, RequestDataTooBig
from django.http import JsonResponse
from isal import isal_zlib

CHUNK = 64 * 1024
NO_ENCODING = {"", "identity", "utf-8", "utf8"}
ENCODINGS = "gzip, deflate, br or zstd"
# What is read and thrown away of a body left unread by an early answer (401, 413,
# 415, 429), so that the connection can serve the next request; past this, or past
# DRAIN_SECONDS, the answer says `Connection: close` instead.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 2.0


# Retry-After of a 503 when PostgreSQL cannot be reached (the API and the pages).
DATABASE_RETRY_AFTER_S = "5"


def allow_methods(*methods: str):
    """A plain view answers these methods only (GET brings HEAD); anything else, TRACE
    included, gets 405 with `Allow` and a JSON body. Checked before the login."""
    allowed = [*methods, *(["HEAD"] if "GET" in methods and "HEAD" not in methods else [])]

    def decorate(view):
        @functools.wraps(view)
        def checked(request, *args, **kwargs):
            if request.method not in allowed:
                return method_not_allowed(request.method, allowed)
            return view(request, *args, **kwargs)

        checked.allowed_methods = allowed
        return checked

    return decorate


def method_not_allowed(method: str, allowed: list[str]) -> JsonResponse:
    response = JsonResponse(
        {"detail": f"method {method} not allowed here: use {', '.join(allowed)}"}, status=405
    )
    response["Allow"] = ", ".join(allowed)
    return response


class BodyError(Exception):
    """A whole request is refused: status code and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(BodyError, RequestDataTooBig):
    """A chunked body past its limit: 413 from our handlers, 400 from Django's."""


class MalformedBody(BodyError, BadRequest):
    """A chunked body the server could not decode (bad chunk sizes, a cut stream)."""


class RequestInput:
    """The request body as the server frames it, for `request.read()`.

    `length` is the Content-Length, or None for a body that ends at EOF (chunked,
    decoded by the server). Such a body is held to `limit`; `read_body` lifts the
    limit to enforce its own, every other reader (request.body: JSON endpoints,
    forms) keeps Django's DATA_UPLOAD_MAX_MEMORY_SIZE.
    """

    def __init__(self, stream, length: int | None, limit: int | None):
        self._stream = stream
        self.length = length
        self.limit = limit
        self.consumed = 0
        self.ended = length == 0

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(CHUNK):
                parts.append(part)
            return b"".join(parts)
        return self._take(lambda n: self._stream.read(n), size)

    def readline(self, size: int | None = -1, /) -> bytes:
        return self._take(
            lambda n: self._stream.readline(n), CHUNK if not size or size < 0 else size
        )

    def _take(self, reader, size: int) -> bytes:
        if self.ended or size == 0:
            return b""
        if self.length is not None:
            size = min(size, self.length - self.consumed)
        try:
            data = reader(size)
        except OSError:
            raise
        except Exception as exc:  # gunicorn's chunk parser: InvalidChunkSize and kin
            self.ended = True
            raise MalformedBody(400, f"malformed chunked body: {type(exc).__name__}") from None
        self.consumed += len(data)
        if not data or (self.length is not None and self.consumed >= self.length):
            self.ended = True
        if self.limit is not None and self.consumed > self.limit:
            raise BodyTooLarge(413, f"body larger than {self.limit} bytes")
        return data

    def close(self) -> None:
        """Django closes the stream once request.body has it all; the server owns the socket."""

    def drain(self, budget: int = DRAIN_BYTES, seconds: float = DRAIN_SECONDS) -> bool:
        """Read and discard what is left, up to `budget` bytes. True when the body ended."""
        if self.length is not None and self.length - self.consumed > budget:
            return False  # not worth reading: the connection closes instead
        self.limit = None
        deadline = time.monotonic() + seconds
        try:
            while not self.ended and budget > 0 and time.monotonic() < deadline:
                budget -= len(self.read(min(CHUNK, budget)))
        except (OSError, BodyError):
            return False
        return self.ended


def lift_limit(stream) -> None:
    """A reader that enforces its own limit (read_body) takes over from RequestInput's."""
    body = getattr(stream, "_stream", None)
    if isinstance(body, RequestInput):
        body.limit = None


# The server's request object, where the server lets us mark its connection for
# closing (gunicorn, through portal.gunicorn_conf's pre_request hook). A WSGI
# application may not send `Connection` itself (PEP 3333: hop-by-hop headers).
_server = threading.local()


def remember_server_request(request) -> None:
    _server.request = request


def close_connection() -> None:
    """Ask the server to answer `Connection: close` and close after this answer."""
    request = getattr(_server, "request", None)
    if request is not None and hasattr(request, "force_close"):
        request.force_close()


def read_body(stream, encoding: str, limit: int, raw: list[bytes] | None = None) -> bytes:
    """Read and decompress a request body, refusing it as soon as it passes `limit`.

    The limit applies to the decompressed size and is enforced while streaming,
    so a small bomb is cut off after `limit` bytes of output, not after inflating
    it in memory. The bytes as received are appended to `raw` if given. A body cut
    short inside its compressed stream is refused (400), whatever came out so far.
    """
    encoding = (encoding or "").strip().lower()
    decoder = _decoder(encoding)
    lift_limit(stream)
    out = bytearray()
    raw_seen = 0
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        raw_seen += len(chunk)
        if raw_seen > limit + 65536:
            raise BodyError(413, f"body larger than {limit} bytes")
        if raw is not None:
            raw.append(chunk)
        if decoder is None:
            out += chunk
        else:
            try:
                decoder.feed(chunk, out, limit)
            except (zlib.error, isal_zlib.error, brotli.error, zstandard.ZstdError):
                raise BodyError(400, f"body is not valid {encoding} data") from None
        if len(out) > limit:
            raise BodyError(413, f"body larger than {limit} bytes after decompression")
    if decoder is not None and raw_seen and not decoder.finished:
        raise BodyError(400, f"body is truncated {encoding} data")
    return bytes(out)


def _decoder(encoding: str):
    if encoding in NO_ENCODING:
        return None
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(gzip=True)
    if encoding == "deflate":
        return _Zlib(gzip=False)
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    raise BodyError(415, f"unsupported Content-Encoding {encoding!r}: use {ENCODINGS}")


class _Zlib:
    """gzip (every member of a multi-member body, as gunzip reads them) and deflate
    (zlib-wrapped, gzip, or raw as some clients send it)."""

    def __init__(self, gzip: bool):
        self.gzip = gzip
        self.started = False
        # ISA-L inflates gzip ~3x faster than zlib, with zlib's interface.
        self.inflate = (
            isal_zlib.decompressobj(16 + zlib.MAX_WBITS)
            if gzip
            else zlib.decompressobj(32 + zlib.MAX_WBITS)
        )

    @property
    def finished(self) -> bool:
        return self.inflate.eof

    def feed(self, data: bytes, out: bytearray, limit: int) -> None:
        first, self.started = not self.started, True
        try:
            self._feed(data, out, limit)
        except zlib.error:
            if self.gzip or not first or out:
                raise
            self.inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no header
            self._feed(data, out, limit)

    def _feed(self, data: bytes, out: bytearray, limit: int) -> None:
        while data:
            out += self.inflate.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                return
            data = self.inflate.unconsumed_tail
            if not data and self.inflate.eof and self.inflate.unused_data and self.gzip:
                data = self.inflate.unused_data
                self.inflate = isal_zlib.decompressobj(16 + zlib.MAX_WBITS)


class _Brotli:
    def __init__(self):
        self.inflate = brotli.Decompressor()

    @property
    def finished(self) -> bool:
        return self.inflate.is_finished()

    def feed(self, data: bytes, out: bytearray, limit: int) -> None:
        out += self.inflate.process(data, output_buffer_limit=limit + 1 - len(out))
        while len(out) <= limit and not self.inflate.can_accept_more_data():
            out += self.inflate.process(b"", output_buffer_limit=limit + 1 - len(out))


class _Zstd:
    # zstandard's streaming decoder cannot bound its output, and a few bytes of an RLE
    # block expand to 128 KB: input goes in small slices so that a bomb passes the
    # limit by at most a few MB before it is refused.
    SLICE = 256

    def __init__(self):
        self.inflate = zstandard.ZstdDecompressor().decompressobj()

    @property
    def finished(self) -> bool:
        return self.inflate.eof

    def feed(self, data: bytes, out: bytearray, limit: int) -> None:
        view = memoryview(data)
        for start in range(0, len(view), self.SLICE):
            piece = view[start : start + self.SLICE]
            while piece:
                if self.inflate.eof:
                    # Frames one after the other: each is read, as zstd -d reads them.
                    self.inflate = zstandard.ZstdDecompressor().decompressobj()
                out += self.inflate.decompress(piece)
                if len(out) > limit:
                    return
                piece = self.inflate.unused_data if self.inflate.eof else b""

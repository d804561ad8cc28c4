"""Request bodies: read within a limit, decompressed while streaming.

Shared by every endpoint that takes a body (ingest receivers, artifacts, heartbeats).
Content-Encoding gzip, deflate, br and zstd are read; an empty value, `identity` or
`UTF-8` (sent by some Sentry SDKs) mean none.
"""

from __future__ import annotations

import zlib

import brotli
import zstandard
from isal import isal_zlib

CHUNK = 64 * 1024
NO_ENCODING = {"", "identity", "utf-8", "utf8"}
ENCODINGS = "gzip, deflate, br or zstd"


class BodyError(Exception):
    """A whole request is refused: status code and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def read_body(stream, encoding: str, limit: int, raw: list[bytes] | None = None) -> bytes:
    """Read and decompress a request body, refusing it as soon as it passes `limit`.

    The limit applies to the decompressed size and is enforced while streaming,
    so a small bomb is cut off after `limit` bytes of output, not after inflating
    it in memory. The bytes as received are appended to `raw` if given. A body cut
    short inside its compressed stream is refused (400), whatever came out so far.
    """
    encoding = (encoding or "").strip().lower()
    decoder = _decoder(encoding)
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

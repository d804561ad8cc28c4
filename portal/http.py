"""Request bodies: read within a limit, decompressed while streaming.

Shared by every endpoint that takes a body (ingest receivers, artifacts, heartbeats).
"""

from __future__ import annotations

import zlib

from isal import isal_zlib

CHUNK = 64 * 1024


class BodyError(Exception):
    """A whole request is refused: status code and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def read_body(stream, encoding: str, limit: int, raw: list[bytes] | None = None) -> bytes:
    """Read and decompress a request body, refusing it as soon as it passes `limit`.

    The limit applies to the decompressed size and is enforced while streaming,
    so a small gzip bomb is cut off after `limit` bytes of output, not after
    inflating it in memory. The bytes as received are appended to `raw` if given.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        decompressor = None
    elif encoding in ("gzip", "x-gzip"):
        # ISA-L inflates gzip ~3x faster than zlib, with zlib's interface.
        decompressor = isal_zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header
    else:
        raise BodyError(415, f"unsupported Content-Encoding {encoding!r}: use gzip or deflate")

    gzipped = encoding in ("gzip", "x-gzip")
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
        if decompressor is None:
            out += chunk
        else:
            try:
                data = chunk
                while data:
                    out += decompressor.decompress(data, limit + 1 - len(out))
                    if len(out) > limit:
                        break
                    data = decompressor.unconsumed_tail
                    if not data and decompressor.eof and decompressor.unused_data and gzipped:
                        # Several gzip members one after the other (`cat a.gz b.gz`, a
                        # shipper appending): each is read, as gunzip reads them.
                        data = decompressor.unused_data
                        decompressor = isal_zlib.decompressobj(16 + zlib.MAX_WBITS)
            except (zlib.error, isal_zlib.error):
                if encoding == "deflate" and raw_seen == len(chunk) and not out:
                    # Some clients send raw deflate without the zlib header.
                    decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
                    try:
                        out += decompressor.decompress(chunk, limit + 1)
                    except zlib.error:
                        raise BodyError(400, "body is not valid deflate data") from None
                else:
                    raise BodyError(400, f"body is not valid {encoding} data") from None
        if len(out) > limit:
            raise BodyError(413, f"body larger than {limit} bytes after decompression")
    if decompressor is not None and not decompressor.eof and out:
        raise BodyError(400, f"body is truncated {encoding} data")
    return bytes(out)

"""Image bytes for the pixel-limit tests: a PNG that declares a size and holds no pixels."""

from __future__ import annotations

import struct
import zlib


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring ``width`` x ``height`` RGB8 + IEND, no IDAT: a few
    dozen bytes whose header claims any number of pixels (what a decompression bomb looks like
    before decoding)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")

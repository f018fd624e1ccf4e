"""Compression formats by their magic bytes, and unpacking them: one table for all.

Pure: gzip, xz, lzma and bzip2 come from the standard library; zstd and lz4 go through
``external`` (the caller's way of running a decompressor program), so nothing here runs
a process by itself.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Callable, Optional

External = Callable[[str, bytes], Optional[bytes]]

MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),  # the kernel's legacy lz4 frame
    (b"\x04\x22\x4d\x18", "lz4"),  # the lz4 frame format
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


def sniff(data: bytes) -> str | None:
    """The compression ``data`` starts with, or None."""
    for magic, fmt in MAGICS:
        if data.startswith(magic):
            return fmt
    return None


def decompress(fmt: str, data: bytes, external: External | None = None) -> bytes | None:
    """``data`` unpacked from ``fmt``, or None when it is damaged or cannot be done here.
    Trailing bytes after the stream (a kernel build appends the size) are ignored."""
    try:
        if fmt == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data)
        if fmt == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if fmt == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if fmt == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError):
        return None
    if external is not None:
        return external(fmt, data)
    return None

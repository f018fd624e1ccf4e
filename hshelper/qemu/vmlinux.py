"""Unpacking an x86 bzImage into its ELF vmlinux, and checking it for a PVH entry.

Pure functions over bytes. The bzImage's setup header says where the compressed kernel
(the "payload") sits; its first bytes say how it is compressed (hshelper.codec); zstd
and lz4 go through ``decompress_cmd`` (the caller's way of running an external
decompressor) so this module stays free of side effects.
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

from hshelper import codec

DecompressCmd = Callable[[str, bytes], Optional[bytes]]

# Offsets in the real-mode setup header (Documentation/arch/x86/boot.rst).
SETUP_SECTS = 0x1F1
HEADER_MAGIC = 0x202  # "HdrS"
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C

# The PVH entry point is an ELF note named "Xen" of type XEN_ELFNOTE_PHYS32_ENTRY.
PVH_NOTE_NAME = b"Xen"
PVH_NOTE_TYPE = 18
PT_NOTE = 4

def payload(image: bytes) -> tuple[str, bytes] | None:
    """(format, compressed bytes) of a bzImage's kernel, or None if it is not one."""
    if len(image) < PAYLOAD_LENGTH + 4 or image[HEADER_MAGIC:HEADER_MAGIC + 4] != b"HdrS":
        return None
    setup_sects = image[SETUP_SECTS] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    data = image[start + offset:start + offset + length]
    if len(data) != length or length == 0:
        return None
    fmt = codec.sniff(data)
    return (fmt, data) if fmt else None


def decompress(fmt: str, data: bytes, decompress_cmd: DecompressCmd | None = None) -> bytes | None:
    """The uncompressed payload, or None when it cannot be unpacked here. Every format
    but gzip has the uncompressed size appended by the kernel build: the standard
    library's decoders stop at the stream's end, an external one gets it cut off."""
    def external(name: str, blob: bytes) -> bytes | None:
        return decompress_cmd(name, blob[:-4]) if decompress_cmd else None

    return codec.decompress(fmt, data, external)


def extract_vmlinux(image: bytes, decompress_cmd: DecompressCmd | None = None) -> bytes | None:
    """The ELF vmlinux inside a bzImage; an ELF given as is is returned unchanged."""
    if image.startswith(b"\x7fELF"):
        return image
    found = payload(image)
    if found is None:
        return None
    elf = decompress(*found, decompress_cmd=decompress_cmd)
    if not elf or not elf.startswith(b"\x7fELF"):
        return None
    return elf


def _notes(blob: bytes):
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos:pos + namesz].rstrip(b"\x00")
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3
        yield name, ntype


def has_pvh_note(elf: bytes) -> bool:
    """True when a 64-bit little-endian ELF has the Xen PVH entry note qemu boots through."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        ptype, = struct.unpack_from("<I", elf, base)
        if ptype != PT_NOTE:
            continue
        offset, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        for name, ntype in _notes(elf[offset:offset + size]):
            if name == PVH_NOTE_NAME and ntype == PVH_NOTE_TYPE:
                return True
    return False

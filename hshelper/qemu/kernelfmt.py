"""Kernel image formats as distributions ship them, and what qemu should boot instead.

Pure functions over bytes. qemu 7.2 boots most shipped kernels as they are (an x86
bzImage, an arm64 ``Image``, a ppc64 ELF ``vmlinux``, an s390x ``image``), but not all,
and not always fastest:

- an x86 bzImage with a PVH entry note boots faster as its unpacked ELF ``vmlinux``
  (under TCG the guest's own decompression costs seconds);
- an EFI zboot image (``MZ`` + ``zimg``: a small EFI stub around a compressed kernel,
  as Fedora ships arm64 and riscv64 kernels) cannot be loaded by qemu at all: the
  payload is unpacked on the host;
- a gzip-compressed ``Image.gz`` is unpacked for the architectures whose qemu loader
  does not decompress (riscv64).

``decompress_cmd`` is the caller's way of running an external decompressor (zstd, lz4)
for formats the standard library lacks, so this module has no side effects.
"""

from __future__ import annotations

import gzip
import struct
import zlib

from hshelper import codec
from hshelper.qemu import vmlinux
from hshelper.qemu.vmlinux import DecompressCmd

ZBOOT_MAGIC = b"zimg"
ARM64_MAGIC = b"ARM\x64"  # at 0x38 of an arm64 Image
RISCV_MAGIC = b"RSC\x05"  # at 0x38 of a riscv Image


def kind(data: bytes) -> str:
    """What a kernel file is: zboot, gzip, elf, bzimage, arm64-image, riscv-image, other."""
    if data[:2] == b"MZ" and data[4:8] == ZBOOT_MAGIC:
        return "zboot"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"\x7fELF":
        return "elf"
    if data[0x202:0x206] == b"HdrS":
        return "bzimage"
    if data[0x38:0x3C] == ARM64_MAGIC:
        return "arm64-image"
    if data[0x38:0x3C] == RISCV_MAGIC:
        return "riscv-image"
    return "other"


def zboot_payload(data: bytes) -> tuple[str, bytes] | None:
    """(compression, compressed kernel) of an EFI zboot image (Linux's zboot-header.S:
    the payload's offset and size at 8 and 12, the compression's name at 24)."""
    if kind(data) != "zboot" or len(data) < 0x40:
        return None
    offset, size = struct.unpack_from("<II", data, 8)
    name = data[24:40].split(b"\0", 1)[0].decode("ascii", "replace")
    payload = data[offset:offset + size]
    if len(payload) != size or not size:
        return None
    return name, payload


def boot_image(data: bytes, kernel_format: str,
               decompress_cmd: DecompressCmd | None = None) -> tuple[bytes | None, str]:
    """What qemu should boot instead of ``data``, and why.

    Returns (bytes, reason) when an unpacked kernel should be booted, (None, reason)
    when the file is booted as it is. ``kernel_format`` is the machine table's.
    """
    found = kind(data)
    if kernel_format == "x86":
        elf = vmlinux.extract_vmlinux(data, decompress_cmd=decompress_cmd)
        if elf is not None and vmlinux.has_pvh_note(elf):
            return elf, "the unpacked vmlinux, through its PVH entry (faster under TCG)"
        return None, "the bzImage as it is (no PVH entry note)"
    if found == "zboot":
        payload = zboot_payload(data)
        if payload is None:
            return None, "an EFI zboot image with an unreadable header"
        unpacked = codec.decompress(payload[0], payload[1], decompress_cmd)
        if unpacked is None:
            return None, f"an EFI zboot image whose {payload[0]} payload cannot be unpacked"
        return unpacked, f"the {payload[0]} payload of the EFI zboot image (qemu cannot load " \
                         "zboot)"
    if found == "gzip" and kernel_format in ("riscv", "arm64", "arm"):
        try:
            return gzip.decompress(data), "the gunzipped Image"
        except (OSError, EOFError, zlib.error):
            return None, "a gzip file that does not unpack"
    return None, f"the {found} file as it is"

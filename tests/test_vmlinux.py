"""bzImage unpacking and the PVH note check, on synthetic images built here (every
compression) and on the real kernels of the test build roots."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest

from hshelper.qemu import vmlinux


def fake_elf(pvh: bool) -> bytes:
    """A minimal ELF64 with one PT_NOTE holding a note (the PVH one, or another)."""
    name = b"Xen\0"
    ntype = vmlinux.PVH_NOTE_TYPE if pvh else 5
    note = struct.pack("<III", len(name), 4, ntype) + name + b"\0\0\0\0"
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, vmlinux.PT_NOTE)
    struct.pack_into("<Q", phdr, 8, 64 + 56)
    struct.pack_into("<Q", phdr, 32, len(note))
    return bytes(ehdr + phdr + note) + b"kernel text" * 50


def fake_bzimage(compressed: bytes, setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[vmlinux.SETUP_SECTS] = setup_sects
    setup[vmlinux.HEADER_MAGIC:vmlinux.HEADER_MAGIC + 4] = b"HdrS"
    offset = 0x3A0  # where the kernel puts it varies; the header says
    struct.pack_into("<II", setup, vmlinux.PAYLOAD_OFFSET, offset, len(compressed))
    return bytes(setup) + b"\x90" * offset + compressed + b"\0" * 64


def with_size(data: bytes, raw: bytes) -> bytes:
    return data + struct.pack("<I", len(raw))


@pytest.mark.parametrize("fmt", ["gzip", "xz", "lzma", "bzip2"])
def test_stdlib_formats(fmt):
    elf = fake_elf(pvh=True)
    packed = {"gzip": lambda d: gzip.compress(d),
              "xz": lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_XZ), d),
              "lzma": lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_ALONE), d),
              "bzip2": lambda d: with_size(bz2.compress(d), d)}[fmt](elf)
    image = fake_bzimage(packed)
    assert vmlinux.payload(image)[0] == fmt
    assert vmlinux.extract_vmlinux(image) == elf
    assert vmlinux.has_pvh_note(elf)


def test_external_formats_go_through_the_callback():
    elf = fake_elf(pvh=True)
    image = fake_bzimage(with_size(b"\x28\xb5\x2f\xfd" + b"opaque", elf))
    seen = []

    def decompress(fmt, data):
        seen.append((fmt, data))
        return elf

    assert vmlinux.extract_vmlinux(image, decompress_cmd=decompress) == elf
    assert seen == [("zstd", b"\x28\xb5\x2f\xfdopaque")]  # size trailer stripped
    assert vmlinux.extract_vmlinux(image) is None  # no way to unpack it: say so


def test_no_pvh_note_and_garbage():
    assert not vmlinux.has_pvh_note(fake_elf(pvh=False))
    assert not vmlinux.has_pvh_note(b"\x7fELF" + b"\0" * 10)
    assert vmlinux.extract_vmlinux(b"MZ not a kernel" * 100) is None
    corrupt = fake_bzimage(b"\x1f\x8b" + b"\0" * 40)
    assert vmlinux.extract_vmlinux(corrupt) is None


@pytest.mark.slow
def test_real_debian_kernel_has_pvh(bookworm):
    kernel = next((bookworm / "boot").glob("vmlinuz-*"))
    elf = vmlinux.extract_vmlinux(kernel.read_bytes())
    assert elf is not None and elf.startswith(b"\x7fELF")
    assert vmlinux.has_pvh_note(elf)

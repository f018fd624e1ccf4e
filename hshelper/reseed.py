"""The guest's RNG reseed program, for machines whose guests cannot see ``vmgenid``.

A restored VM starts from the RNG state of its save, so every restore would draw the
same random numbers (the same filesystem UUIDs) unless the kernel reseeds. On x86 the
``vmgenid`` device makes it do so (ACPI); the other machines here have no ACPI with a
directly booted kernel, so after writing the host's bytes to /dev/urandom the guest asks
for the reseed itself: ``ioctl(fd, RNDRESEEDCRNG)`` (Linux 4.17+; root only), which
rekeys the kernel's CRNG from its input pool and makes every per-CPU generator and
batch rekey before its next use. No shell and no busybox applet can issue an ioctl, so
this module writes the smallest static ELF that does: ``ioctl(0, RNDRESEEDCRNG, 0)``
on its standard input (``/hshelper/reseed </dev/urandom``), then ``exit`` with the
ioctl's result (0, or an error number: never 0 on failure).

Pure functions only: machine code per architecture as instruction words, an ELF header
around them.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from hshelper import guestabi
from hshelper.qemu.machines import EM_AARCH64, EM_ARM, EM_PPC64, EM_RISCV, EM_S390

GUEST_PATH = guestabi.RESEED
LOAD_ADDRESS = 0x400000
MIN_KERNEL = (4, 17)  # the first with RNDRESEEDCRNG


@dataclass(frozen=True)
class Code:
    """One architecture's program: ELF identity and the instructions."""

    e_machine: int
    elf_class: int  # 32 or 64
    little_endian: bool
    text: bytes
    e_flags: int = 0


def _words(words: list[int], little_endian: bool) -> bytes:
    return b"".join(struct.pack("<I" if little_endian else ">I", w) for w in words)


# Each: ioctl(0, RNDRESEEDCRNG, 0), then exit with its result (in the register where the
# syscall left it). RNDRESEEDCRNG is _IO('R', 0x07): 0x5207, and 0x20005207 on powerpc,
# whose _IO() sets a direction bit for "none". Syscall numbers: ioctl 29 and exit 93 in
# the generic table (arm64, riscv64), ioctl 54 and exit 1 in the older ones (arm,
# powerpc, s390).
CODE: dict[str, Code] = {
    "aarch64": Code(EM_AARCH64, 64, True, _words([
        0xD2800000,  # mov x0, #0
        0xD28A40E1,  # mov x1, #0x5207
        0xD2800002,  # mov x2, #0
        0xD28003A8,  # mov x8, #29 (ioctl)
        0xD4000001,  # svc #0
        0xD2800BA8,  # mov x8, #93 (exit; x0: the ioctl's result)
        0xD4000001,  # svc #0
    ], True)),
    "armv7l": Code(EM_ARM, 32, True, _words([
        0xE3A00000,  # mov r0, #0
        0xE3051207,  # movw r1, #0x5207
        0xE3A02000,  # mov r2, #0
        0xE3A07036,  # mov r7, #54 (ioctl)
        0xEF000000,  # svc #0
        0xE3A07001,  # mov r7, #1 (exit; r0: the ioctl's result)
        0xEF000000,  # svc #0
    ], True), e_flags=0x05000000),  # EABI version 5
    "riscv64": Code(EM_RISCV, 64, True, _words([
        0x00000513,  # li a0, 0
        0x000055B7,  # lui a1, 0x5
        0x2075859B,  # addiw a1, a1, 0x207
        0x00000613,  # li a2, 0
        0x01D00893,  # li a7, 29 (ioctl)
        0x00000073,  # ecall
        0x05D00893,  # li a7, 93 (exit; a0: the ioctl's result)
        0x00000073,  # ecall
    ], True)),
    "ppc64le": Code(EM_PPC64, 64, True, _words([
        0x38600000,  # li r3, 0
        0x3C802000,  # lis r4, 0x2000
        0x60845207,  # ori r4, r4, 0x5207
        0x38A00000,  # li r5, 0
        0x38000036,  # li r0, 54 (ioctl)
        0x44000002,  # sc
        0x38000001,  # li r0, 1 (exit; r3: 0, or the error number)
        0x44000002,  # sc
    ], True), e_flags=2),  # ELFv2: the entry point is the code itself
    "s390x": Code(EM_S390, 64, False, bytes.fromhex(
        "a7290000"  # lghi %r2, 0
        "a7395207"  # lghi %r3, 0x5207
        "a7490000"  # lghi %r4, 0
        "0a36"  # svc 54 (ioctl)
        "0a01"  # svc 1 (exit; r2: the ioctl's result)
    )),
}


def supported(arch: str) -> bool:
    return arch in CODE


def program(arch: str) -> bytes:
    """The static ELF executable for ``arch`` (one PT_LOAD segment, no sections)."""
    code = CODE[arch]
    end = "<" if code.little_endian else ">"
    if code.elf_class == 64:
        ehsize, phsize = 64, 56
        ident_class = 2
    else:
        ehsize, phsize = 52, 32
        ident_class = 1
    entry = LOAD_ADDRESS + ehsize + phsize
    size = ehsize + phsize + len(code.text)
    ident = b"\x7fELF" + bytes([ident_class, 1 if code.little_endian else 2, 1, 0]) + bytes(8)
    pt_load, pf_rx, et_exec = 1, 5, 2
    if code.elf_class == 64:
        header = ident + struct.pack(f"{end}HHIQQQIHHHHHH", et_exec, code.e_machine, 1, entry,
                                     ehsize, 0, code.e_flags, ehsize, phsize, 1, 0, 0, 0)
        phdr = struct.pack(f"{end}IIQQQQQQ", pt_load, pf_rx, 0, LOAD_ADDRESS, LOAD_ADDRESS,
                           size, size, 0x1000)
    else:
        header = ident + struct.pack(f"{end}HHIIIIIHHHHHH", et_exec, code.e_machine, 1, entry,
                                     ehsize, 0, code.e_flags, ehsize, phsize, 1, 0, 0, 0)
        phdr = struct.pack(f"{end}IIIIIIII", pt_load, 0, LOAD_ADDRESS, LOAD_ADDRESS, size,
                           size, pf_rx, 0x1000)
    return header + phdr + code.text


def kernel_has_it(kernel_version: str) -> bool:
    """Whether a kernel of this version ("6.1.0-13-arm64") has RNDRESEEDCRNG."""
    match = re.match(r"(\d+)\.(\d+)", kernel_version)
    return bool(match) and (int(match[1]), int(match[2])) >= MIN_KERNEL

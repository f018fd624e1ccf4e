"""ELF reading without running anything: program interpreter, needed libraries, search
paths, named sections; and the shared-library closure the way glibc's ld.so finds it.

Only the headers and the dynamic section are parsed; no binary from the build root is
ever executed (it may be for another libc, or not runnable on the host at all).
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hshelper import rootpath

PT_INTERP, PT_DYNAMIC = 3, 2
DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 1, 5, 14, 15, 29
MACHINES_64_LIB64 = {62, 183, 21, 22}  # x86_64, aarch64, ppc64, s390x: /lib64 first


@dataclass(frozen=True)
class ElfInfo:
    elf_class: int  # 32 or 64
    little_endian: bool
    machine: int
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    soname: str | None


class _Reader:
    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF" or len(data) < 52:
            raise ValueError("not an ELF file")
        self.data = data
        self.is64 = data[4] == 2
        self.end = "<" if data[5] == 1 else ">"

    def unpack(self, fmt: str, offset: int) -> tuple:
        fmt = self.end + fmt
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.data):
            raise ValueError("truncated ELF file")
        return struct.unpack_from(fmt, self.data, offset)

    def header(self) -> dict:
        f = self.unpack("HHIQQQIHHHHHH" if self.is64 else "HHIIIIIHHHHHH", 16)
        names = ("type", "machine", "version", "entry", "phoff", "shoff", "flags", "ehsize",
                 "phentsize", "phnum", "shentsize", "shnum", "shstrndx")
        return dict(zip(names, f))

    def segments(self, h: dict):
        for i in range(h["phnum"]):
            off = h["phoff"] + i * h["phentsize"]
            if self.is64:
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = self.unpack("IIQQQQQQ", off)
            else:
                p_type, p_offset, p_vaddr, _, p_filesz, _, _, _ = self.unpack("IIIIIIII", off)
            yield p_type, p_offset, p_vaddr, p_filesz

    def sections(self, h: dict):
        for i in range(h["shnum"]):
            off = h["shoff"] + i * h["shentsize"]
            if self.is64:
                name, _, _, addr, offset, size, *_ = self.unpack("IIQQQQIIQQ", off)
            else:
                name, _, _, addr, offset, size, *_ = self.unpack("IIIIIIIIII", off)
            yield name, addr, offset, size

    def cstring(self, offset: int) -> str:
        end = self.data.find(b"\0", offset)
        if offset >= len(self.data) or end < 0:
            raise ValueError("truncated ELF string")
        return self.data[offset:end].decode("utf-8", "replace")


def _vaddr_to_offset(segments: list, vaddr: int) -> int:
    for p_type, p_offset, p_vaddr, p_filesz in segments:
        if p_type == 1 and p_vaddr <= vaddr < p_vaddr + p_filesz:  # PT_LOAD
            return vaddr - p_vaddr + p_offset
    raise ValueError("dynamic string table outside any loaded segment")


def parse_elf(data: bytes) -> ElfInfo | None:
    """The dynamic-linking facts of an ELF image; None when ``data`` is not ELF."""
    if data[:4] != b"\x7fELF":
        return None
    r = _Reader(data)
    h = r.header()
    segments = list(r.segments(h))
    interp = None
    entries: list[tuple[int, int]] = []
    for p_type, p_offset, _, p_filesz in segments:
        if p_type == PT_INTERP:
            interp = r.cstring(p_offset)
        elif p_type == PT_DYNAMIC:
            size = 16 if r.is64 else 8
            for i in range(p_filesz // size):
                tag, val = r.unpack("qQ" if r.is64 else "iI", p_offset + i * size)
                if tag == 0:
                    break
                entries.append((tag, val))
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    needed, rpath, runpath, soname = [], [], [], None
    if strtab is not None:
        base = _vaddr_to_offset(segments, strtab)
        for tag, val in entries:
            if tag == DT_NEEDED:
                needed.append(r.cstring(base + val))
            elif tag == DT_RPATH:
                rpath += [p for p in r.cstring(base + val).split(":") if p]
            elif tag == DT_RUNPATH:
                runpath += [p for p in r.cstring(base + val).split(":") if p]
            elif tag == DT_SONAME:
                soname = r.cstring(base + val)
    return ElfInfo(64 if r.is64 else 32, r.end == "<", h["machine"], interp, tuple(needed),
                   tuple(rpath), tuple(runpath), soname)


def read_elf(path: Path) -> ElfInfo | None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"\x7fELF":
            return None
        fh.seek(0)
        return parse_elf(fh.read())


def section_data(data: bytes, name: str) -> bytes | None:
    """The raw bytes of section ``name`` (e.g. a module's ".modinfo"), or None."""
    r = _Reader(data)
    h = r.header()
    secs = list(r.sections(h))
    if not secs or h["shstrndx"] >= len(secs):
        return None
    names_off = secs[h["shstrndx"]][2]
    for sh_name, _, offset, size in secs:
        if r.cstring(names_off + sh_name) == name:
            if offset + size > len(data):
                raise ValueError("truncated ELF section")
            return data[offset:offset + size]
    return None


def read_ld_so_conf(root: Path, conf: str = "/etc/ld.so.conf", _depth: int = 0) -> list[str]:
    """The directories listed in ld.so.conf inside ``root``, includes followed."""
    try:
        text = rootpath.resolve(root, conf).host.read_text()
    except (OSError, rootpath.RootPathError):
        return []
    dirs: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include") and _depth < 8:
            for pattern in line.split()[1:]:
                if not pattern.startswith("/"):
                    pattern = os.path.join(os.path.dirname(conf), pattern)
                host_pattern = str(rootpath.host_path(root, pattern))
                for match in sorted(glob.glob(host_pattern)):
                    guest = "/" + os.path.relpath(match, root)
                    dirs += read_ld_so_conf(root, guest, _depth + 1)
        elif line.startswith("/"):
            dirs.append(line)
    return list(dict.fromkeys(dirs))


def multiarch_dirs(root: Path) -> list[str]:
    """Debian's multiarch library directories in ``root`` (/lib/aarch64-linux-gnu, ...).
    Debian's ld.so searches them by default, also without /etc/ld.so.conf (a root
    unpacked without running libc-bin's scripts has none); a directory of another
    architecture is harmless, as its libraries are skipped by their ELF header."""
    found = []
    for base in ("/lib", "/usr/lib"):
        for match in sorted(glob.glob(str(rootpath.host_path(root, base)) + "/*-linux-gnu*")):
            if os.path.isdir(match):
                found.append(f"{base}/{os.path.basename(match)}")
    return found


def default_lib_dirs(info: ElfInfo) -> list[str]:
    """ld.so's built-in trusted directories, searched after ld.so.conf's."""
    if info.elf_class == 64 and info.machine in MACHINES_64_LIB64:
        return ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    return ["/lib", "/usr/lib"]


@dataclass(frozen=True)
class Closure:
    files: tuple[str, ...]
    missing: tuple[tuple[str, str], ...]


def _expand(path: str, origin: str, info: ElfInfo) -> str:
    lib = "lib64" if info.elf_class == 64 and info.machine in MACHINES_64_LIB64 else "lib"
    for token, value in (("$ORIGIN", origin), ("${ORIGIN}", origin), ("$LIB", lib),
                         ("${LIB}", lib)):
        path = path.replace(token, value)
    return path


def elf_closure(root: Path, start: Iterable[str],
                search_dirs: Sequence[str] | None = None,
                cache: dict[str, ElfInfo | None] | None = None) -> Closure:
    """Every file ``start`` needs to run in ``root``: interpreters and libraries.

    Per object: PT_INTERP; each DT_NEEDED searched in its DT_RPATH (when it has no
    DT_RUNPATH; the rpath of the objects that loaded it is not inherited here, a
    simplification that real distributions do not trip over), DT_RUNPATH, then
    ld.so.conf and the default directories. Candidates of another ELF class or machine
    are skipped as ld.so skips them. Scripts contribute their ``#!`` interpreter.
    Returned paths are guest paths as looked up (the caller recreates the symlinks).
    ``cache`` (parsed headers by resolved path) may be shared between calls on one root.
    """
    cache = {} if cache is None else cache
    conf_dirs = read_ld_so_conf(root) if search_dirs is None else list(search_dirs)
    conf_dirs += [d for d in multiarch_dirs(root) if d not in conf_dirs]

    def info_of(guest: str) -> ElfInfo | None:
        try:
            real = rootpath.resolve(root, guest)
        except (OSError, rootpath.RootPathError):
            return None
        if real.path not in cache:
            try:
                cache[real.path] = read_elf(real.host) if real.host.is_file() else None
            except (OSError, ValueError):
                cache[real.path] = None
        return cache[real.path]

    def exists(guest: str) -> bool:
        try:
            return rootpath.resolve(root, guest).host.is_file()
        except (OSError, rootpath.RootPathError):
            return False

    files: set[str] = set()
    missing: list[tuple[str, str]] = []
    todo: list[tuple[str, str]] = [(path, "") for path in start]
    while todo:
        guest, needed_by = todo.pop()
        guest = rootpath.normalize(guest)
        if guest in files:
            continue
        if needed_by and not exists(guest):
            # An interpreter or a library named by path that is not there.
            missing.append((guest, needed_by))
            continue
        files.add(guest)
        info = info_of(guest)
        if info is None:
            interp = _shebang(root, guest)
            if interp:
                todo.append((interp, guest))
            continue
        if info.interp:
            todo.append((info.interp, guest))
        origin = os.path.dirname(guest)
        own = [] if info.runpath else list(info.rpath)
        dirs = [_expand(d, origin, info) for d in (*own, *info.runpath)]
        dirs += conf_dirs + default_lib_dirs(info)
        for needed in info.needed:
            if "/" in needed:
                todo.append((_expand(needed, origin, info), guest))
                continue
            for directory in dirs:
                candidate = f"{directory.rstrip('/')}/{needed}"
                if not exists(candidate):
                    continue
                lib = info_of(candidate)
                if lib is None or lib.elf_class != info.elf_class or lib.machine != info.machine:
                    continue
                todo.append((candidate, guest))
                break
            else:
                missing.append((needed, guest))
    return Closure(tuple(sorted(files)), tuple(missing))


def _shebang(root: Path, guest: str) -> str | None:
    try:
        with open(rootpath.resolve(root, guest).host, "rb") as fh:
            head = fh.read(256)
    except (OSError, rootpath.RootPathError):
        return None
    words = shebang_words(head)
    return words[0] if words else None


def shebang_words(head: bytes) -> list[str]:
    """The words of a script's ``#!`` line (from its first bytes); [] for no script."""
    if not head.startswith(b"#!"):
        return []
    return head[2:].split(b"\n", 1)[0].decode(errors="replace").split()

"""The kernel to hand to qemu: the decompressed vmlinux when it has a PVH entry point.

Under TCG the guest's own decompression of a bzImage costs seconds (XZ kernels most);
qemu can boot the ELF vmlinux directly through its Xen PVH note instead. The vmlinux is
extracted once per kernel file (keyed by path, size, mtime and inode) and cached; a
kernel without PVH (or in a format we cannot unpack) is remembered as such and booted
as it is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hshelper import runner, vmlinux
from hshelper.atomic import write_atomic


def _decompress_cmd(fmt: str, data: bytes) -> bytes | None:
    argv = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}.get(fmt)
    if argv is None:
        return None
    try:
        return runner.pipe(argv, data)
    except Exception:
        return None


def bootable(kernel: Path, cache: Path) -> Path:
    """The path qemu should boot for ``kernel``: a cached PVH vmlinux, or the kernel."""
    st = kernel.stat()
    ident = f"{kernel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
    where = cache / "kernels" / hashlib.sha256(ident).hexdigest()[:24]
    elf, no_pvh = where / "vmlinux", where / "no-pvh"
    if elf.is_file():
        return elf
    if no_pvh.exists():
        return kernel
    where.mkdir(parents=True, exist_ok=True)
    data = vmlinux.extract_vmlinux(kernel.read_bytes(), decompress_cmd=_decompress_cmd)
    if data is None or not vmlinux.has_pvh_note(data):
        no_pvh.touch()
        return kernel
    return write_atomic(elf, data)

"""The kernel file to hand to qemu: the installed one, or an unpacked form made once.

hshelper.qemu.kernelfmt decides (an x86 PVH vmlinux, an EFI zboot payload, a gunzipped
Image); this module keeps the result in the cache, keyed by the kernel file's identity
(path, size, mtime, inode), checked before each use (hshelper.cache), and remembers a
kernel that is booted as it is.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from hshelper import cache, runner
from hshelper.qemu import kernelfmt


@dataclass(frozen=True)
class BootKernel:
    """The file qemu boots and why that one."""

    path: Path
    reason: str


def _external(fmt: str, data: bytes) -> bytes | None:
    argv = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}.get(fmt)
    if argv is None:
        return None
    try:
        return runner.pipe(argv, data)
    except Exception:  # noqa: BLE001 - any failure means "boot the file as it is"
        return None


def bootable(kernel: Path, kernel_format: str, kernels_dir: Path) -> BootKernel:
    """What qemu should boot for ``kernel`` (a host path), from the cache when it can."""
    st = kernel.stat()
    ident = f"{kernel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{kernel_format}"
    where = kernels_dir / hashlib.sha256(ident.encode()).hexdigest()[:24]
    unpacked, as_is = where / "vmlinux", where / "as-is"
    if as_is.exists():
        return BootKernel(kernel, as_is.read_text())
    if unpacked.exists():
        problem = cache.damage(unpacked)
        if problem is None:
            return BootKernel(unpacked, (where / "reason").read_text())
        print(f"hshelper: the cached unpacked kernel {unpacked} was damaged ({problem}); "
              "unpacking it again", file=sys.stderr)
        cache.discard(unpacked)
    where.mkdir(parents=True, exist_ok=True)
    data, reason = kernelfmt.boot_image(kernel.read_bytes(), kernel_format, _external)
    if data is None:
        as_is.write_text(reason)
        return BootKernel(kernel, reason)
    (where / "reason").write_text(reason)
    cache.write_checked(unpacked, data)
    return BootKernel(unpacked, reason)

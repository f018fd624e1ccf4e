"""What a build root holds: kernels, their modules and config, programs, busybox.

Read-only probing of a directory tree that stands for ``/`` (``/`` itself when hshelper
runs inside the build root, or ``--sysroot DIR`` from outside). Never needs root, never
runs anything from the tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hshelper import elf, rootpath
from hshelper.errors import HshelperError

# The kernel package to install, per distribution family (from /etc/os-release ID/ID_LIKE).
KERNEL_PACKAGES = {
    "altlinux": "kernel-image-un-def",
    "fedora": "kernel-core",
    "rhel": "kernel-core",
    "centos": "kernel-core",
    "debian": "linux-image-amd64",
    "ubuntu": "linux-image-generic",
    "suse": "kernel-default",
    "arch": "linux",
}

# Where a build root's architecture shows: its shell and core programs.
ARCH_WITNESSES = ("/bin/sh", "/usr/bin/env", "/bin/busybox", "/usr/bin/busybox", "/bin/ls")
DEFAULT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MODULE_DIRS = ("/lib/modules", "/usr/lib/modules")


@dataclass(frozen=True)
class Kernel:
    """One installed kernel: its version, image, module dir and config (guest paths)."""

    version: str
    image: str
    moddir: str | None
    config: str | None


def version_key(version: str) -> tuple:
    """Sort key that puts 6.12.9 after 6.1.0 and 6.1.0-28 after 6.1.0-9."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                 for p in re.split(r"[.\-+_~]", version))


def parse_kconfig(text: str) -> dict[str, str]:
    """CONFIG_X=value lines of a kernel config into a dict (``# ... is not set`` omitted)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            out[key] = value.strip('"')
    return out


def busybox_applets(binary: bytes) -> frozenset[str]:
    """The applet names compiled into a busybox binary, read from its name table.

    Busybox keeps its applet names as one sorted, NUL-separated string table starting
    with "[" and "[[". Reading it avoids running a binary from the build root.
    """
    start = binary.find(b"[\0[[\0")
    if start < 0:
        return frozenset()
    names = []
    previous = ""
    for raw in binary[start:start + 65536].split(b"\0"):
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            break
        if not name or name < previous or not re.fullmatch(r"[\[\]a-z0-9_.\-]+", name):
            break
        names.append(name)
        previous = name
    return frozenset(names)


class Sysroot:
    """Probe a build root. ``root`` is the host path of its ``/``."""

    def __init__(self, root: Path | str = "/"):
        self.root = Path(root)

    def host(self, guest: str) -> Path:
        return rootpath.host_path(self.root, guest)

    def resolve(self, guest: str) -> rootpath.Resolved:
        return rootpath.resolve(self.root, guest)

    def exists(self, guest: str) -> bool:
        try:
            return self.resolve(guest).host.exists()
        except (OSError, rootpath.RootPathError):
            return False

    # ------------------------------------------------------------ distribution

    @cached_property
    def os_release(self) -> dict[str, str]:
        for candidate in ("/etc/os-release", "/usr/lib/os-release"):
            try:
                text = self.resolve(candidate).host.read_text()
            except (OSError, rootpath.RootPathError):
                continue
            pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
            return {k: v.strip().strip('"') for k, _, v in pairs}
        return {}

    def kernel_package_hint(self) -> str:
        """What to install for a kernel, for this distribution and architecture (the
        machine table's package names, from the build root's own programs)."""
        from hshelper.qemu import machines  # data only; the arch comes from the root

        found = self.binary_arch()
        machine = machines.from_elf(*found[0]) if found else None
        names = dict(KERNEL_PACKAGES, **(machine.kernel_packages if machine else {}))
        ids = [self.os_release.get("ID", "")] + self.os_release.get("ID_LIKE", "").split()
        for distro_id in ids:
            if distro_id in names:
                return f"install the kernel package: {names[distro_id]}"
        debian = names.get("debian", "linux-image-amd64")
        return ("install a kernel package (ALT: kernel-image-un-def, Fedora: kernel-core, "
                f"Debian: {debian})")

    # ------------------------------------------------------------ kernels

    def _module_dir_versions(self) -> dict[str, str]:
        """version -> module dir guest path, over both /lib and /usr/lib layouts."""
        found: dict[str, str] = {}
        for base in MODULE_DIRS:
            try:
                real = self.resolve(base)
                names = sorted(os.listdir(real.host))
            except (OSError, rootpath.RootPathError):
                continue
            for name in names:
                if (real.host / name).is_dir():
                    found.setdefault(name, f"{real.path}/{name}")
        return found

    def kernels(self) -> list[Kernel]:
        """Every kernel whose image is present, newest first."""
        moddirs = self._module_dir_versions()
        images: dict[str, str] = {}
        for version, moddir in moddirs.items():
            if self.exists(f"{moddir}/vmlinuz"):  # Fedora, Arch, usr-merged layouts
                images[version] = f"{moddir}/vmlinuz"
        try:
            boot = sorted(os.listdir(self.host("/boot")))
        except OSError:
            boot = []
        for name in boot:
            for prefix in ("vmlinuz-", "bzImage-", "vmlinux-"):
                if name.startswith(prefix) and not name.endswith((".old", ".bak")):
                    images.setdefault(name[len(prefix):], f"/boot/{name}")
        kernels = []
        for version, image in images.items():
            moddir = moddirs.get(version)
            candidates = [f"/boot/config-{version}"] + ([f"{moddir}/config"] if moddir else [])
            config = next((c for c in candidates if self.exists(c)), None)
            kernels.append(Kernel(version, image, moddir, config))
        return sorted(kernels, key=lambda k: version_key(k.version), reverse=True)

    def searched_kernel_paths(self) -> list[str]:
        return ["/boot/vmlinuz-VERSION", *(f"{b}/VERSION/vmlinuz" for b in MODULE_DIRS)]

    def kernel(self, version: str | None = None) -> Kernel:
        """The kernel to use: ``version`` if given, else the newest installed one."""
        kernels = self.kernels()
        if not kernels:
            raise HshelperError(
                f"no kernel found in {self.root} (searched "
                f"{', '.join(self.searched_kernel_paths())})",
                hint=self.kernel_package_hint())
        if version is None:
            chosen = kernels[0]
        else:
            matches = [k for k in kernels if k.version == version]
            if not matches:
                have = ", ".join(k.version for k in kernels)
                raise HshelperError(f"kernel {version} not found in {self.root} (have: {have})")
            chosen = matches[0]
        self._check_readable(chosen)
        return chosen

    def _check_readable(self, kernel: Kernel) -> None:
        image = self.resolve(kernel.image).host
        if not os.access(image, os.R_OK):
            raise HshelperError(
                f"kernel image {kernel.image} is not readable by uid {os.getuid()}",
                hint=f"make it readable: chmod a+r {kernel.image} (ALT and Debian install "
                     "kernels 0600; hshelper's package trigger does this at install time)")
        if kernel.moddir and not os.access(self.resolve(kernel.moddir).host, os.R_OK | os.X_OK):
            raise HshelperError(
                f"module directory {kernel.moddir} is not readable by uid {os.getuid()}",
                hint=f"make it readable: chmod -R a+rX {kernel.moddir}")

    def kernel_config(self, kernel: Kernel) -> dict[str, str]:
        if kernel.config is None:
            return {}
        try:
            return parse_kconfig(self.resolve(kernel.config).host.read_text())
        except OSError:
            return {}

    # ------------------------------------------------------------ programs

    def which(self, name: str, path: tuple[str, ...] = DEFAULT_PATH) -> str | None:
        """Guest path of program ``name`` on ``path`` (first executable regular file)."""
        if "/" in name:
            return name if self.exists(name) else None
        for directory in path:
            candidate = f"{directory}/{name}"
            try:
                real = self.resolve(candidate).host
            except (OSError, rootpath.RootPathError):
                continue
            if real.is_file() and os.access(real, os.X_OK):
                return candidate
        return None

    @cached_property
    def busybox(self) -> str | None:
        return self.which("busybox")

    @cached_property
    def applets(self) -> frozenset[str]:
        if self.busybox is None:
            return frozenset()
        try:
            return busybox_applets(self.resolve(self.busybox).host.read_bytes())
        except OSError:
            return frozenset()

    # ------------------------------------------------------------ architecture

    def _elf_id(self, guest: str) -> tuple[int, int, bool] | None:
        try:
            info = elf.read_elf(self.resolve(guest).host)
        except (OSError, ValueError, rootpath.RootPathError):
            return None
        return (info.machine, info.elf_class, info.little_endian) if info else None

    def binary_arch(self) -> tuple[tuple[int, int, bool], str] | None:
        """(e_machine, ELF class, little endian) of the build root's programs, and the
        program that said so; None when none is an ELF file."""
        for guest in ARCH_WITNESSES:
            found = self._elf_id(guest)
            if found:
                return found, guest
        return None

    def kernel_arch(self, kernel: Kernel) -> tuple[tuple[int, int, bool], str] | None:
        """The same for ``kernel``, from one of its modules (the kernel decides which
        qemu runs it: a 32-bit root may carry a 64-bit kernel). Only uncompressed
        modules are read, and only the first few hundred names are looked at."""
        if not kernel.moddir:
            return None
        try:
            moddir = self.resolve(kernel.moddir).host
        except (OSError, rootpath.RootPathError):
            return None
        seen = 0
        for dirpath, _, files in os.walk(moddir / "kernel"):
            for name in sorted(files):
                seen += 1
                if seen > 300:
                    return None
                if name.endswith(".ko"):
                    rel = os.path.relpath(os.path.join(dirpath, name), moddir)
                    found = self._elf_id(f"{kernel.moddir}/{rel}")
                    if found:
                        return found, f"{kernel.moddir}/{rel}"
        return None

    @cached_property
    def dpkg_arch(self) -> str | None:
        """The package database's architecture (Debian: dpkg's own package's)."""
        try:
            text = self.resolve("/var/lib/dpkg/status").host.read_text(errors="replace")
        except (OSError, rootpath.RootPathError):
            return None
        for block in text.split("\n\n"):
            if "Package: dpkg\n" in block + "\n":
                for line in block.splitlines():
                    if line.startswith("Architecture:"):
                        return line.split(":", 1)[1].strip()
        return None

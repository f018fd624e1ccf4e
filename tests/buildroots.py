"""Real build roots for the tests, made by mmdebstrap and cached between runs.

Each root is described by a Recipe (suite, packages, extra mirrors, a post-processing
step); its cache directory under /var/tmp/hshelper-test-roots is named by a hash of that
description, so changing a package list makes a new root and only the first run pays.
Roots are made in a temporary directory and renamed into place, under a lock, so an
interrupted run never leaves a half-made root that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("HSHELPER_TEST_ROOTS", "/var/tmp/hshelper-test-roots"))
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
BACKPORTS = f"deb {MIRROR} bookworm-backports main"
# Bumped when the way roots are made changes in a way the recipe does not show.
LAYOUT_VERSION = 3

# What hshelper itself needs in a build root (a packager would install the same).
HSHELPER_DEPS = ["python3", "python3-pluggy", "python3-sh", "python3-tenacity", "python3-toml"]
DISK_TOOLS = ["kmod", "fdisk", "gdisk", "dosfstools", "e2fsprogs", "util-linux", "mtools"]
QEMU = ["qemu-system-x86", "qemu-utils", "zstd"]
# What real image scripts call besides the disk tools (tests/test_scripts.py).
IMAGE_TOOLS = ["parted", "kpartx", "dmsetup", "lvm2", "cryptsetup-bin", "mdadm",
               "squashfs-tools", "xorriso", "grub-pc-bin", "grub2-common", "udev"]


@dataclass(frozen=True)
class Recipe:
    packages: tuple[str, ...]
    extra_sources: tuple[str, ...] = ()
    derive: str = ""  # another root this one is made from (a layout change), not mmdebstrap
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def key(self, name: str) -> str:
        text = json.dumps([name, LAYOUT_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {
    # Debian 12 as a packager's build root: generic 6.1 kernel (plain .ko, 9p modules),
    # busybox, qemu and the disk tools. The root most tests run in.
    "bookworm": Recipe(tuple(["linux-image-amd64", "busybox", *HSHELPER_DEPS, *DISK_TOOLS,
                              *QEMU])),
    # The same without busybox: bash/dash, coreutils, util-linux, kmod supply the guest.
    "bookworm-nobusybox": Recipe(tuple(["linux-image-amd64", *HSHELPER_DEPS, *DISK_TOOLS])),
    # bookworm-backports' 6.12 kernel: modules are .ko.xz.
    "bookworm-612": Recipe(tuple(["linux-image-amd64/bookworm-backports", "busybox",
                                  *HSHELPER_DEPS, "kmod", "fdisk", "e2fsprogs"]),
                           extra_sources=(BACKPORTS,)),
    # The cloud kernel: no 9p at all.
    "bookworm-cloud": Recipe(tuple(["linux-image-cloud-amd64", "busybox", *HSHELPER_DEPS,
                                    "kmod", "fdisk", "e2fsprogs"])),
    # Fedora's layout, made from bookworm-612: kernel at /usr/lib/modules/V/vmlinuz, an
    # empty /boot, .ko.xz modules and no modules.dep (as if unpacked without depmod).
    "fedora-layout": Recipe((), derive="bookworm-612"),
    # hasher's view of the world, made from bookworm: /dev holds only null, zero and
    # urandom (and /proc is mounted only when asked for).
    "hasher-like": Recipe((), derive="bookworm"),
    # Not a build root: the system the image recipes (recipes/, issue 5) turn into a
    # bootable disk. The cloud kernel boots fastest under TCG; initramfs-tools makes the
    # initrd; the recipes install the bootloaders from it: systemd-boot's EFI binary,
    # GRUB's monolithic EFI image (removable path), extlinux and its MBR code (BIOS).
    "target-bookworm": Recipe(("linux-image-cloud-amd64", "initramfs-tools",
                               "systemd-boot-efi", "grub-efi-amd64-bin", "extlinux",
                               "syslinux-common")),
    # The bookworm build root plus xfsprogs and btrfs-progs: the recipes' --fs xfs|btrfs
    # (their mkfs, and the modules that come with it, enter the helper image).
    "bookworm-xfs-btrfs": Recipe(tuple(["linux-image-amd64", "busybox", *HSHELPER_DEPS,
                                        *DISK_TOOLS, *QEMU, "xfsprogs", "btrfs-progs"])),
    # The bookworm build root plus the tools image scripts call (tests/scripts/): parted,
    # kpartx, LVM, cryptsetup, mdadm, squashfs, xorriso, GRUB for BIOS, udev's udevadm.
    # busybox stays installed: its applets must not shadow the GNU tools.
    "bookworm-imagetools": Recipe(tuple(["linux-image-amd64", "busybox", *HSHELPER_DEPS,
                                         *DISK_TOOLS, *QEMU, *IMAGE_TOOLS])),
}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def root_path(name: str) -> Path:
    return CACHE / f"{name}-{RECIPES[name].key(name)}"


def ensure_root(name: str) -> Path:
    """The cached root called ``name``, made first when missing."""
    recipe = RECIPES[name]
    target = root_path(name)
    if (target / ".hshelper-root-done").exists():
        return target
    source = ensure_root(recipe.derive) if recipe.derive else None
    with _locked(CACHE / f".{name}.lock"):
        if (target / ".hshelper-root-done").exists():
            return target
        for stale in CACHE.glob(f"{name}-*"):  # older recipes of this root
            if stale != target and stale.name[len(name) + 1:].isalnum():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = CACHE / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if source is not None:
                # cp, not shutil.copytree: a root has device nodes (/dev/zero) that
                # copytree would read forever; -x stays out of a /proc a test mounted.
                subprocess.run(["cp", "-ax", str(source), str(tmp)], check=True)
                DERIVE[name](tmp)
            else:
                _mmdebstrap(recipe, tmp)
            (tmp / ".hshelper-root-done").write_text(json.dumps(asdict(recipe)) + "\n")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _mmdebstrap(recipe: Recipe, dest: Path) -> None:
    argv = ["mmdebstrap", "--quiet", "--variant=minbase", "--format=directory",
            "--include=" + ",".join(recipe.packages),
            # No docs or translations: smaller roots, faster copies.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            # A build user's home, owned by the build user (65534, as hasher's is not root).
            "--customize-hook=mkdir -p \"$1/home/builder\" && "
            "chown 65534:65534 \"$1/home/builder\"",
            "bookworm", str(dest), MIRROR, f"deb {SECURITY} bookworm-security main",
            *recipe.extra_sources]
    subprocess.run(argv, check=True)


def _hasher_dev(root: Path) -> None:
    for entry in (root / "dev").iterdir():
        if entry.name not in ("null", "zero", "urandom"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _fedora_layout(root: Path) -> None:
    moddirs = sorted((root / "usr/lib/modules").iterdir())
    for moddir in moddirs:
        version = moddir.name
        for boot_name, fedora_name in (("vmlinuz", "vmlinuz"), ("config", "config"),
                                       ("System.map", "System.map")):
            boot_file = root / "boot" / f"{boot_name}-{version}"
            if boot_file.exists():
                os.rename(boot_file, moddir / fedora_name)
        for dep in moddir.glob("modules.*"):
            if dep.name not in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
                dep.unlink()
    for entry in (root / "boot").iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


DERIVE = {"fedora-layout": _fedora_layout, "hasher-like": _hasher_dev}

"""Checking the disk images the recipes make, from the host, with real tools only.

``sfdisk --json`` for the layout, ``fsck -n`` on each filesystem, debugfs and mtools to
read files without mounting, ``blkid -p`` for the filesystems' UUIDs, and qemu with
OVMF (UEFI) or SeaBIOS (legacy BIOS) to boot the image to a marker the booted system
prints. Shared by tests/test_recipes.py, scripts/demo.py and bench/bench_mkimage.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
# UEFI for aarch64 (Debian's qemu-efi-aarch64), and the machine that boots it.
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
UBOOT_ARM64 = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")  # u-boot-qemu
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
MARKER = "HSHELPER-MARKER"
# The booted image's init (init=/usr/local/sbin/marker): prove the root, the fstab and
# the ESP, then power off. A full systemd boot would take minutes under TCG.
MARKER_INIT = f"""#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{MARKER} root $(awk '$2 == "/" {{print $1, $3}}' /proc/mounts)"
printf '%s\n' "{MARKER} cmdline $(cat /proc/cmdline)"  # printf: no escapes
if grep -q /boot/efi /etc/fstab && mount /boot/efi; then
    echo "{MARKER} esp $(ls /boot/efi/EFI/BOOT)"
    umount /boot/efi
fi
echo "{MARKER} done"
echo o >/proc/sysrq-trigger
sleep 30
"""
MARKER_PATH = "usr/local/sbin/marker"


@dataclass(frozen=True)
class Partition:
    node: str
    start: int  # in 512-byte sectors
    size: int
    type: str
    uuid: str = ""
    name: str = ""
    bootable: bool = False


@dataclass(frozen=True)
class Layout:
    label: str  # "gpt" or "dos"
    label_id: str
    partitions: tuple[Partition, ...]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def sfdisk_dump(image: Path) -> str:
    return run(["sfdisk", "-d", str(image)], check=True).stdout


def layout(image: Path) -> Layout:
    table = json.loads(run(["sfdisk", "--json", str(image)], check=True).stdout)["partitiontable"]
    parts = tuple(Partition(p["node"], p["start"], p["size"], p["type"], p.get("uuid", ""),
                            p.get("name", ""), bool(p.get("bootable")))
                  for p in table["partitions"])
    return Layout(table["label"], table.get("id", ""), parts)


def extract(image: Path, part: Partition, dest: Path) -> Path:
    """Copy one partition out of the image (sparse), for the fsck and file readers."""
    run(["dd", f"if={image}", f"of={dest}", "bs=512", f"skip={part.start}",
         f"count={part.size}", "conv=sparse", "status=none"], check=True)
    return dest


def fsck(part: Path, fstype: str) -> subprocess.CompletedProcess:
    argv = {"vfat": ["fsck.vfat", "-n"], "ext4": ["e2fsck", "-fn"],
            "xfs": ["xfs_repair", "-n", "-f"], "btrfs": ["btrfs", "check", "--readonly"]}[fstype]
    return run([*argv, str(part)])


def probe(part: Path) -> dict[str, str]:
    """blkid -p: the filesystem's TYPE, UUID, LABEL as written on it."""
    out = run(["blkid", "-p", "-o", "export", str(part)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def ext_cat(part: Path, path: str) -> str:
    return run(["debugfs", "-R", f"cat {path}", str(part)]).stdout


def ext_exists(part: Path, path: str) -> bool:
    proc = run(["debugfs", "-R", f"stat {path}", str(part)])
    return "Inode:" in proc.stdout


def fat_cat(part: Path, path: str) -> str:
    return run(["mtype", "-i", str(part), f"::{path}"]).stdout


def fat_ls(part: Path, path: str) -> list[str]:
    proc = run(["mdir", "-b", "-i", str(part), f"::{path}"])
    return sorted(line.rstrip("/").rsplit("/", 1)[-1] for line in proc.stdout.splitlines()
                  if line.strip())


def target_tarball(source_root: Path, dest: Path, exclude: tuple[str, ...] = ()) -> Path:
    """The target root as a plain tarball (numeric owners), with the marker init;
    ``exclude``: more tar --exclude patterns (./usr/share: what the marker boot needs
    not)."""
    tmp = dest.with_name(dest.name + ".tmp")
    run(["tar", "--numeric-owner", "--xattrs", "--exclude=./.hshelper-root-done",
         *(f"--exclude={pattern}" for pattern in exclude),
         "-C", str(source_root), "-cf", str(tmp), "."], check=True)
    with tempfile.TemporaryDirectory() as extra:
        marker = Path(extra) / MARKER_PATH
        marker.parent.mkdir(parents=True)
        marker.write_text(MARKER_INIT)
        marker.chmod(0o755)
        run(["tar", "--numeric-owner", "--owner=0", "--group=0", "-rf", str(tmp),
             "-C", extra, f"./{MARKER_PATH}"], check=True)
    os.rename(tmp, dest)
    return dest


def boot(image: Path, firmware: str, log: Path, timeout: float = 600,
         fmt: str = "raw", arch: str = "x86_64") -> str:
    """Boot ``image`` under TCG with UEFI (OVMF; AAVMF for aarch64), legacy BIOS
    (SeaBIOS) or, on aarch64, U-Boot (its distro boot reads extlinux.conf, as on
    boards); return the serial console's text once the guest powered off (or the
    timeout passed)."""
    with tempfile.TemporaryDirectory() as tmp:
        if arch == "aarch64" and firmware == "u-boot":
            argv = ["qemu-system-aarch64", "-machine", "virt,accel=tcg",
                    "-cpu", "max,pauth=off", "-m", "512", "-display", "none", "-no-reboot",
                    "-serial", f"file:{log}", "-bios", str(UBOOT_ARM64),
                    "-drive", f"file={image},format={fmt},if=none,id=d,snapshot=on",
                    "-device", "virtio-blk-pci,drive=d"]
        elif arch == "aarch64":
            vars_copy = Path(tmp) / "vars.fd"
            shutil.copy(AAVMF_VARS, vars_copy)
            argv = ["qemu-system-aarch64", "-machine", "virt,accel=tcg",
                    "-cpu", "max,pauth=off", "-m", "512", "-display", "none", "-no-reboot",
                    "-serial", f"file:{log}",
                    "-drive", f"if=pflash,format=raw,readonly=on,file={AAVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={vars_copy}",
                    "-drive", f"file={image},format={fmt},if=none,id=d,snapshot=on",
                    "-device", "virtio-blk-pci,drive=d"]
            firmware = "aavmf"
        else:
            argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "512",
                    "-display", "none", "-no-reboot", "-serial", f"file:{log}",
                    "-drive", f"file={image},format={fmt},if=virtio,snapshot=on"]
        if firmware == "uefi":
            vars_copy = Path(tmp) / "vars.fd"
            shutil.copy(OVMF_VARS, vars_copy)
            argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,file={vars_copy}"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return log.read_text(errors="replace")


def marker_lines(console: str) -> list[str]:
    return [line[line.index(MARKER):].strip() for line in console.splitlines()
            if MARKER in line and "echo" not in line]


@contextlib.contextmanager
def loop_mounted(fs_image: Path, mountpoint: Path, readonly: bool = True):
    """A filesystem image loop-mounted for the test (tests run as root on the host)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = "loop,ro" if readonly else "loop"
    run(["mount", "-o", opts, str(fs_image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        run(["umount", str(mountpoint)], check=False)


def tree_listing(top: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Everything a root filesystem must keep of each entry below ``top``: type and
    mode, owners, size, mtime (seconds), link target, device numbers, xattrs, a
    content hash, and for hard links the first name of the inode."""
    found: dict[str, tuple] = {}
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(top))
            if rel.split("/")[0] in skip:
                continue
            st = os.lstat(path)
            xattrs = tuple(sorted((a, os.getxattr(path, a, follow_symlinks=False))
                                  for a in os.listxattr(path, follow_symlinks=False)))
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                groups.setdefault(st.st_ino, []).append(rel)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            found[rel] = (st.st_mode, st.st_uid, st.st_gid, size, int(st.st_mtime), link,
                          st.st_rdev, xattrs, digest, st.st_ino)
    for names in groups.values():
        for rel in names:
            found[rel] = (*found[rel][:-1], min(names))
    for rel, value in found.items():
        if isinstance(value[-1], int):
            found[rel] = (*value[:-1], "")
    return found

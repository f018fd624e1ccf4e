"""Image scripts as packagers already have them (tests/scripts/*.sh), run unchanged.

Each script is plain sh or bash written for a root shell on an ordinary Debian system:
losetup, parted, kpartx, mkfs, blkid, mount, tar, chroot into the new root, grub-install,
LVM, LUKS, RAID, squashfs, ISO. Each runs as ``helper-run ./SCRIPT ARGS`` as the build
user (uid 65534) in the bookworm-imagetools build root, in the default mode, with no
``--with``, ``--module`` or ``--mode``; the result is checked on the host with real tools
(sfdisk, fsck, debugfs, blkid, unsquashfs, xorriso, cryptsetup, booting with SeaBIOS).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import chroot
import pytest

from hshelper import elf, rootpath

pytestmark = [pytest.mark.slow, pytest.mark.vm]

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT_NAME = "bookworm-imagetools"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69C47D8E4D"
# Programs of the build root that make up the small root tree the image scripts unpack
# and chroot into (with their own libraries, found by hshelper's ELF closure).
CHROOT_PROGRAMS = ("/usr/bin/dash", "/usr/bin/ls", "/usr/bin/uname", "/usr/bin/cat")


@pytest.fixture(scope="module")
def tools(root_factory):
    """The build root with the image tools, /proc mounted for the module's tests."""
    root = root_factory(ROOT_NAME)
    with chroot.proc_mounted(root):
        yield root


def workdir(root: Path, name: str) -> tuple[str, Path]:
    """A fresh working directory for the build user holding the corpus scripts."""
    guest = chroot.fresh_dir(root, name)
    host = root / guest.lstrip("/")
    for script in SCRIPTS.glob("*.sh"):
        shutil.copy(script, host / script.name)
        os.chown(host / script.name, chroot.BUILD_UID, chroot.BUILD_UID)
    return guest, host


def helper_run(root: Path, work: str, *argv: str, timeout: float = 1200):
    """``helper-run ARGV`` as the build user in ``work``: no hshelper option at all."""
    proc = chroot.run(root, ["helper-run", *argv], cwd=work, timeout=timeout)
    assert chroot.wait_no_qemu(root), "qemu left running"
    return proc


def output(proc) -> str:
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def own(path: Path) -> Path:
    os.chown(path, chroot.BUILD_UID, chroot.BUILD_UID)
    return path


def chroot_tarball(build_root: Path, dest: Path) -> Path:
    """A small merged-/usr root tree as a tarball (owners 0): dash as /bin/sh, a few
    coreutils and every library they load, as a root filesystem tarball has them."""
    closure = elf.elf_closure(build_root, CHROOT_PROGRAMS)
    assert not closure.missing, closure.missing
    entries: dict[str, tuple[bytes, int, bytes, str]] = {}  # name: type, mode, data, link
    for d in ("etc", "dev", "proc", "sys", "root", "boot", "var/lib", "usr/bin", "usr/sbin",
              "usr/lib64"):
        entries[d] = (tarfile.DIRTYPE, 0o755, b"", "")
    entries["tmp"] = (tarfile.DIRTYPE, 0o1777, b"", "")
    for top in ("bin", "lib", "lib64", "sbin"):
        entries[top] = (tarfile.SYMTYPE, 0o777, b"", f"usr/{top}")
    for guest in closure.files:
        real = rootpath.resolve(build_root, guest)
        name = real.path.lstrip("/")
        entries[name] = (tarfile.REGTYPE, 0o755, real.host.read_bytes(), "")
        # The name it was looked up by (ld.so's path in PT_INTERP, a soname link).
        looked = guest.lstrip("/")
        if looked.split("/")[0] in ("bin", "lib", "lib64", "sbin"):
            looked = f"usr/{looked}"
        if looked != name:
            entries[looked] = (tarfile.SYMTYPE, 0o777, b"", "/" + name)
    entries["usr/bin/sh"] = (tarfile.SYMTYPE, 0o777, b"", "dash")
    for name in list(entries):
        parts = name.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (tarfile.DIRTYPE, 0o755, b"", ""))
    with tarfile.open(dest, "w") as tar:
        for name in sorted(entries):
            kind, mode, data, link = entries[name]
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return dest


# The root tree tests/scripts/rootfs-ext4.sh unpacks: what only root can make, and what
# a build user's own tar cannot keep (name: type, mode, uid, gid, extra).
ROOT_TREE = {
    "etc": ("dir", 0o755, 0, 0, None),
    "etc/shadow": ("file", 0o640, 0, 42, b"root:*:19000:0:99999:7:::\n"),
    "dev": ("dir", 0o755, 0, 0, None),
    "dev/null": ("chr", 0o666, 0, 0, (1, 3)),
    "dev/sda": ("blk", 0o660, 0, 6, (8, 0)),
    "dev/initctl": ("fifo", 0o600, 0, 0, None),
    "usr": ("dir", 0o755, 0, 0, None),
    "usr/bin": ("dir", 0o755, 0, 0, None),
    "usr/bin/passwd": ("file", 0o4755, 0, 0, b"#!/bin/sh\necho passwd\n"),
    "usr/bin/wall": ("file", 0o2755, 0, 5, b"#!/bin/sh\necho wall\n"),
    "usr/bin/chage": ("hard", 0o4755, 0, 0, "usr/bin/passwd"),
    "bin": ("sym", 0o777, 0, 0, "usr/bin"),
    "home": ("dir", 0o755, 0, 0, None),
    "home/user": ("dir", 0o700, 1000, 1000, None),
    "home/user/notes": ("file", 0o600, 1000, 1000, b"private\n"),
    "var": ("dir", 0o755, 0, 0, None),
    "var/log": ("dir", 0o755, 0, 0, None),
    "var/mail": ("dir", 0o2775, 0, 8, None),
    "tmp": ("dir", 0o1777, 0, 0, None),
    "opt": ("dir", 0o755, 0, 0, None),
    "opt/tagged": ("xattr", 0o644, 0, 0, b"user.origin"),
}
TAR_TYPES = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "chr": tarfile.CHRTYPE,
             "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE, "hard": tarfile.LNKTYPE,
             "sym": tarfile.SYMTYPE, "xattr": tarfile.REGTYPE}


def root_tree_tarball(dest: Path) -> Path:
    """ROOT_TREE as a pax tarball (an xattr in SCHILY.xattr), made with tarfile."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, (kind, mode, uid, gid, extra) in ROOT_TREE.items():
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = TAR_TYPES[kind], mode, uid, gid
            info.mtime = 1700000000
            data = None
            if kind in ("chr", "blk"):
                info.devmajor, info.devminor = extra
            elif kind in ("hard", "sym"):
                info.linkname = extra
            elif kind == "file":
                data, info.size = io.BytesIO(extra), len(extra)
            elif kind == "xattr":
                info.pax_headers = {f"SCHILY.xattr.{extra.decode()}": "tarball"}
            tar.addfile(info, data)
    return dest


# A local plugin whose setup step leaves a process holding the step's stderr for a
# while, as the devlinks watcher does for a moment after it starts.
HOLDER_PLUGIN = '''
from hshelper.hookspecs import hookimpl


@hookimpl
def hshelper_guest_setup(spec):
    return [("holder", "sleep 3 &")]
'''


def test_a_process_started_by_a_setup_step_does_not_take_the_output_ports(tools):
    # A virtio port has one opener at a time: the init once opened stderr again for the
    # command while such a process still held it, and the run ended with status 2 and
    # no output (seen as a silent exit 2 of tests/scripts/mkimage-parted.sh).
    work, host = workdir(tools, "port-holder")
    (host / "holder.py").write_text(HOLDER_PLUGIN)
    (host / "hshelper.toml").write_text('[plugins]\nload = ["holder.py"]\n')
    proc = helper_run(tools, work, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"out\n", b"err\n"), output(proc)

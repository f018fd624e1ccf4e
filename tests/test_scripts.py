"""Image scripts as packagers already have them (tests/scripts/*.sh), run unchanged.

Each script is plain sh or bash written for a root shell on an ordinary Debian system:
losetup, parted, kpartx, mkfs, blkid, mount, tar, chroot into the new root, grub-install,
LVM, LUKS, RAID, squashfs, ISO; and Debian's vmdb2 image builder with a spec of its own.
Each runs as ``helper-run ./SCRIPT ARGS`` as the build user (uid 65534) in the
bookworm-imagetools build root, in the default mode, with no ``--with``, ``--module`` or
``--mode``; the result is checked on the host with real tools (sfdisk, fsck, debugfs,
blkid, unsquashfs, xorriso, cryptsetup, mtools, booting with SeaBIOS).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import chroot
import imagecheck
import pytest

from hshelper import elf, rootpath

pytestmark = [pytest.mark.slow, pytest.mark.vm]

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ROOT_NAME = "bookworm-imagetools"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# Programs of the build root that make up the small root tree the image scripts unpack
# and chroot into (with their own libraries, found by hshelper's ELF closure).
CHROOT_PROGRAMS = ("/usr/bin/dash", "/usr/bin/ls", "/usr/bin/uname", "/usr/bin/cat",
                   "/usr/bin/ln")


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
    "etc/gshadow": ("file", 0o000, 0, 42, b"root:*::\n"),
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


def run_script(root: Path, work: str, *argv: str):
    """``helper-run ./SCRIPT ARGS`` (the way a packager runs a script of the source
    tree), which must succeed."""
    proc = helper_run(root, work, *argv)
    assert proc.returncode == 0, output(proc)
    return proc


def debugfs_stat(fs: Path, path: str) -> dict[str, str]:
    """debugfs's stat of ``path``: type, mode (octal text), user, group, links, device
    numbers (decimal "maj:min") and the inode number."""
    text = imagecheck.run(["debugfs", "-R", f"stat {path}", str(fs)]).stdout
    found = {}
    for key, pattern in (("inode", r"Inode: (\d+)"), ("type", r"Type: (\S+)"),
                         ("mode", r"Mode:\s+(\d+)"), ("user", r"User:\s+(\d+)"),
                         ("group", r"Group:\s+(\d+)"), ("links", r"Links: (\d+)"),
                         ("device", r"Device major/minor number: (\d+):(\d+)")):
        m = re.search(pattern, text)
        if m:
            found[key] = ":".join(str(int(g, 16) if key == "device" else g)
                                  for g in m.groups()) if key == "device" else m.group(1)
    return found


def check_fs(part: Path, fstype: str) -> None:
    proc = imagecheck.fsck(part, fstype)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("label", ["msdos", "gpt"])
def test_parted_kpartx_tar_chroot_image(tools, label, tmp_path):
    work, host = workdir(tools, f"parted-{label}")
    own(chroot_tarball(tools, host / "root.tar"))
    run_script(tools, work, "./mkimage-parted.sh", label, "root.tar", "disk.img")
    image = host / "disk.img"
    assert sorted(p.name for p in host.iterdir()) == sorted(
        ["disk.img", "root.tar", *(p.name for p in SCRIPTS.glob("*.sh"))])
    assert image.stat().st_uid == chroot.BUILD_UID

    layout = imagecheck.layout(image)
    assert layout.label == ("dos" if label == "msdos" else "gpt")
    boot, root = layout.partitions
    assert (boot.start, root.start) == (2048, 48 * 2048)
    if label == "msdos":
        assert boot.bootable and (boot.type, root.type) == ("83", "83")
        bootfs = "ext4"
    else:
        assert (boot.type, boot.name, root.type, root.name) == (
            ESP_TYPE, "ESP", LINUX_TYPE, "root")
        bootfs = "vfat"
    bootpart = imagecheck.extract(image, boot, tmp_path / "boot.fs")
    rootpart = imagecheck.extract(image, root, tmp_path / "root.fs")
    check_fs(bootpart, bootfs)
    check_fs(rootpart, "ext4")
    boot_id, root_id = imagecheck.probe(bootpart), imagecheck.probe(rootpart)
    assert (boot_id["TYPE"], root_id["TYPE"], root_id["LABEL"]) == (bootfs, "ext4", "root")

    # fstab from blkid, by the UUIDs the filesystems really have.
    bootdir = "/boot" if label == "msdos" else "/boot/efi"
    fstab = [line.split() for line in imagecheck.ext_cat(rootpart, "/etc/fstab").splitlines()
             if line and not line.startswith("#")]
    assert fstab == [[f"UUID={root_id['UUID']}", "/", "ext4", "errors=remount-ro", "0", "1"],
                     [f"UUID={boot_id['UUID']}", bootdir, bootfs,
                      "defaults" if bootfs == "ext4" else "umask=0077", "0", "2"]]
    # The chroot ran the new root's own programs, with /dev, /proc and /sys bound in.
    info = imagecheck.ext_cat(rootpart, "/etc/image-info").split()
    assert info == ["arch=x86_64", "dev=ok", "proc=ext4", "sys=ok"]
    assert imagecheck.ext_cat(rootpart, "/etc/programs").split() == [
        "cat", "dash", "ln", "ls", "sh", "uname"]
    assert imagecheck.ext_cat(rootpart, "/etc/hostname") == "imagehost\n"
    # tar ran as root: the tarball's owners, not the build user.
    dash = debugfs_stat(rootpart, "/usr/bin/dash")
    assert (dash["user"], dash["group"], dash["mode"]) == ("0", "0", "0755")
    assert imagecheck.ext_exists(rootpart, "/usr/lib/x86_64-linux-gnu/libc.so.6")


def test_a_failing_image_script_cleans_up_in_its_trap(tools):
    # The tarball is missing: tar fails after partitioning, mapping and mounting, and
    # the script's EXIT trap must unmount, unmap and detach as on a real system.
    work, host = workdir(tools, "parted-trap")
    proc = helper_run(tools, work, "sh", "-c",
                      "./mkimage-parted.sh gpt missing.tar disk.img; status=$?; "
                      "echo left: $(dmsetup ls | grep -v 'No devices found') "
                      "$(losetup -a) $(grep -c ' /tmp/tmp' /proc/self/mounts); "
                      "exit $status")
    assert proc.returncode == 2, output(proc)  # tar's status, through set -e
    assert b"missing.tar: Cannot open" in proc.stderr
    assert proc.stdout.decode().splitlines()[-1] == "left: 0", output(proc)
    assert b"busy" not in proc.stderr.lower(), output(proc)


def test_grub_install_on_a_loop_device_boots_with_seabios(tools, tmp_path):
    work, host = workdir(tools, "grub")
    run_script(tools, work, "./grub-bios.sh", "bios.img")
    image = host / "bios.img"
    (part,) = imagecheck.layout(image).partitions
    assert part.bootable and part.start == 2048
    mbr = image.read_bytes()[:512]
    assert b"GRUB" in mbr and mbr[510:] == b"\x55\xaa"  # GRUB's boot.img
    fs = imagecheck.extract(image, part, tmp_path / "boot.fs")
    check_fs(fs, "ext4")  # e2fsck reads ext2 as well
    assert imagecheck.probe(fs)["TYPE"] == "ext2"
    assert imagecheck.ext_exists(fs, "/boot/grub/i386-pc/core.img")
    console = imagecheck.boot(image, "bios", tmp_path / "console.log", timeout=300)
    assert imagecheck.marker_lines(console) == [
        "HSHELPER-MARKER grub root=hd0,msdos1 label=grubboot found=hd0,msdos1",
        "HSHELPER-MARKER grub core.img present", "HSHELPER-MARKER done"], console[-2000:]


def lvm_segment(image: Path, vg: str, lv: str) -> tuple[int, int]:
    """(offset, size) in bytes of logical volume ``lv`` of the single-PV volume group
    ``vg`` on ``image``, from LVM's text metadata (the copy with the highest seqno in the
    metadata area's ring)."""
    data = image.read_bytes()[:1 << 20]
    copies = [(int(m.group(1)), m.start()) for m in re.finditer(
        rb"(?<![\w-])" + vg.encode() + rb' \{\nid = "[^"]+"\nseqno = (\d+)', data)]
    assert copies, "no LVM metadata found"
    _, start = max(copies)
    meta = data[start:data.index(b"\n# Generated by LVM2", start)].decode()
    extent = int(re.search(r"extent_size = (\d+)", meta).group(1)) * 512
    pe_start = int(re.search(r"pe_start = (\d+)", meta).group(1)) * 512
    block = meta[meta.index(f"\n{lv} {{"):]
    count = int(re.search(r"extent_count = (\d+)", block).group(1))
    first = int(re.search(r'stripes = \[\s*"pv0", (\d+)', block).group(1))
    return pe_start + first * extent, count * extent


def test_lvm_on_a_loop_device(tools, tmp_path):
    work, host = workdir(tools, "lvm")
    # The bare name, as packagers write it: the script in the working directory.
    proc = run_script(tools, work, "lvm.sh", "lvm.img", "imagevg")
    assert b"0 logical volume(s) in volume group \"imagevg\" now active" in proc.stdout
    image = host / "lvm.img"
    assert imagecheck.probe(image)["TYPE"] == "LVM2_member"
    offset, size = lvm_segment(image, "imagevg", "data")
    assert size == 48 << 20
    lv = tmp_path / "data.fs"
    imagecheck.run(["dd", f"if={image}", f"of={lv}", "bs=1M", f"skip={offset >> 20}",
                    f"count={size >> 20}", "status=none"], check=True)
    check_fs(lv, "ext4")
    assert imagecheck.probe(lv)["LABEL"] == "lvdata"
    assert imagecheck.ext_cat(lv, "/hello") == "hello from imagevg/data\n"


def test_luks2_container_with_cryptsetup(tools):
    work, host = workdir(tools, "luks")
    (host / "image.key").write_bytes(os.urandom(64))
    own(host / "image.key")
    proc = run_script(tools, work, "./luks.sh", "luks.img", "image.key")
    # cryptsetup read the header from the image file in the working directory too.
    assert re.search(rb"Version:\s+2\nLabel:\s+imagecrypt\n", proc.stdout), output(proc)
    image = host / "luks.img"
    found = imagecheck.probe(image)
    assert (found["TYPE"], found["VERSION"], found["LABEL"]) == ("crypto_LUKS", "2",
                                                                 "imagecrypt")
    # The header as cryptsetup reads it (the build root's cryptsetup, run on the host).
    dump = subprocess.run(["chroot", str(tools), "cryptsetup", "luksDump",
                           f"{work}/luks.img"], capture_output=True, text=True, check=True)
    assert "PBKDF:      argon2id" in dump.stdout and "Memory:     32768" in dump.stdout
    assert b"secret payload" not in image.read_bytes()
    # And the filesystem inside, opened again with the key in a fresh VM.
    proc = helper_run(tools, work, "sh", "-c",
                      "cryptsetup open --readonly --key-file image.key luks.img check && "
                      "e2fsck -fn /dev/mapper/check && "
                      "debugfs -R 'cat /secret' /dev/mapper/check; "
                      "cryptsetup close check")
    assert proc.returncode == 0, output(proc)
    assert b"secret payload\n" in proc.stdout


def md_data(member: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the data on an md v1.2 member: the superblock sits 4 KiB
    in (magic a92b4efc), data_offset and data_size in sectors at bytes 128 and 136."""
    with open(member, "rb") as fh:
        fh.seek(4096)
        sb = fh.read(256)
    assert int.from_bytes(sb[:4], "little") == 0xA92B4EFC
    return (int.from_bytes(sb[128:136], "little") * 512,
            int.from_bytes(sb[136:144], "little") * 512)


def test_mdadm_raid1_of_two_loop_devices(tools, tmp_path):
    work, host = workdir(tools, "raid")
    proc = run_script(tools, work, "./raid1.sh", "a.img", "b.img")
    assert b"Raid Level : raid1" in proc.stdout and b"mdadm: stopped /dev/md0" in proc.stderr
    for name in ("a.img", "b.img"):
        member = host / name
        found = imagecheck.probe(member)
        # The array's name as mdadm records it: the host's name first (the kernel's
        # default "(none)" until the guest got the build host's hostname).
        assert (found["TYPE"], found["LABEL"]) == ("linux_raid_member",
                                                   f"{os.uname().nodename}:imageraid")
        offset, size = md_data(member)
        fs = tmp_path / f"{name}.fs"
        imagecheck.run(["dd", f"if={member}", f"of={fs}", "bs=512", f"skip={offset // 512}",
                        f"count={size // 512}", "status=none"], check=True)
        check_fs(fs, "ext4")
        assert imagecheck.ext_cat(fs, "/hello") == "mirrored\n"


def test_squashfs_in_an_iso_both_loop_mounted(tools, tmp_path):
    work, host = workdir(tools, "live")
    proc = run_script(tools, work, "./live-iso.sh", "live")
    assert b"live system\nlive system image\n" in proc.stdout
    listing = imagecheck.run(["unsquashfs", "-lls", str(host / "live.squashfs")],
                             check=True).stdout
    assert re.search(r"lrwxrwxrwx root/root .* squashfs-root/bin -> \.\./usr/bin", listing)
    assert re.search(r"-rwxr-xr-x root/root .* squashfs-root/usr/bin/env\n", listing)
    assert (host / "live.files").read_text().split() == [
        "/bin", "/etc", "/etc/issue", "/etc/os-release", "/usr", "/usr/bin", "/usr/bin/env"]
    iso = host / "live.iso"
    assert imagecheck.probe(iso)["LABEL"] == "LIVE_TEST"
    extracted = tmp_path / "filesystem.squashfs"
    imagecheck.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract",
                    "/live/filesystem.squashfs", str(extracted)], check=True)
    assert extracted.read_bytes() == (host / "live.squashfs").read_bytes()


def test_tar_numeric_owner_into_the_working_directory_then_mkfs_d(tools):
    work, host = workdir(tools, "rootfs")
    own(root_tree_tarball(host / "tree.tar"))
    run_script(tools, work, "./rootfs-ext4.sh", "tree.tar", "rootfs.img")
    image = host / "rootfs.img"
    check_fs(image, "ext4")
    # What the tarball holds, and what the script changed as root, in the image.
    changed = {"usr/bin/passwd": 0o4711, "usr/bin/chage": 0o4711}
    for name, (kind, mode, uid, gid, extra) in ROOT_TREE.items():
        found = debugfs_stat(image, f"/{name}")
        if kind == "sym":
            assert found["type"] == "symlink"
            assert imagecheck.run(["debugfs", "-R", f"stat /{name}", str(image)]
                                  ).stdout.count(f'Fast link dest: "{extra}"') == 1
            continue
        want_mode = changed.get(name, mode)
        assert (int(found["mode"], 8), found["user"], found["group"]) == (
            want_mode, str(uid), str(gid)), name
        if kind in ("chr", "blk"):
            assert found["type"] == {"chr": "character", "blk": "block"}[kind], name
            assert found["device"] == "{}:{}".format(*extra), name
        if kind == "fifo":
            assert found["type"] == "FIFO"
    assert debugfs_stat(image, "/usr/bin/chage")["inode"] == debugfs_stat(
        image, "/usr/bin/passwd")["inode"]
    assert debugfs_stat(image, "/usr/bin/passwd")["links"] == "2"
    console = debugfs_stat(image, "/dev/console")
    assert (console["type"], console["device"], console["mode"]) == ("character", "5:1",
                                                                     "0600")
    audit = debugfs_stat(image, "/var/log/audit")
    assert (audit["mode"], audit["user"], audit["group"]) == ("0750", "0", "4")
    assert imagecheck.ext_cat(image, "/etc/hostname") == "packed-host\n"
    assert imagecheck.ext_cat(image, "/home/user/notes") == "private\n"
    xattr = imagecheck.run(["debugfs", "-R", "ea_get /opt/tagged user.origin", str(image)])
    assert "tarball" in xattr.stdout, xattr.stdout + xattr.stderr
    # The host's view of ./rootfs: the build user's ordinary files and directories.
    tree = host / "rootfs"
    for path in [tree, *tree.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (chroot.BUILD_UID, chroot.BUILD_UID), path
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or \
            stat.S_ISLNK(st.st_mode), path
    assert os.readlink(tree / "bin") == "usr/bin"
    assert (tree / "dev/null").stat().st_size == 0
    assert stat.S_IMODE((tree / "home/user").stat().st_mode) == 0o700
    assert stat.S_IMODE((tree / "usr/bin/passwd").stat().st_mode) == 0o711
    assert stat.S_IMODE((tree / "etc/gshadow").stat().st_mode) == 0o600
    # A later run still sees root's tree: owners, modes and device nodes kept in xattrs,
    # and a file of mode 0 still readable by root.
    proc = helper_run(tools, work, "sh", "-c", "cat rootfs/etc/gshadow && stat -c "
                      "'%a %u:%g %F %t:%T %n' rootfs/etc/gshadow rootfs/dev/null "
                      "rootfs/usr/bin/passwd rootfs/home/user")
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.decode().splitlines() == [
        "root:*::", "0 0:42 regular file 0:0 rootfs/etc/gshadow",
        "666 0:0 character special file 1:3 rootfs/dev/null",
        "4711 0:0 regular file 0:0 rootfs/usr/bin/passwd",
        "700 1000:1000 directory 0:0 rootfs/home/user"]


def test_chroot_into_a_tree_in_the_working_directory(tools):
    # The root tree is unpacked on the 9p share itself (./chroot), its programs run from
    # there with its own libraries, /dev, /proc and /sys mounted in, then it is packed.
    work, host = workdir(tools, "chroot-workdir")
    own(chroot_tarball(tools, host / "root.tar"))
    proc = run_script(tools, work, "./chroot-workdir.sh", "root.tar", "chroot.img")
    assert b"inside: x86_64\n" in proc.stdout
    image = host / "chroot.img"
    check_fs(image, "ext4")
    assert imagecheck.ext_cat(image, "/var/lib/chroot-ok") == "ok\n"
    ash = debugfs_stat(image, "/usr/bin/ash")
    assert (ash["type"], ash["user"], ash["group"]) == ("symlink", "0", "0")
    dash = debugfs_stat(image, "/usr/bin/dash")
    assert (dash["mode"], dash["user"], dash["group"]) == ("0755", "0", "0")
    assert os.readlink(host / "chroot/usr/bin/ash") == "/usr/bin/dash"


def test_gnu_options_where_busybox_is_installed_too(tools):
    work, host = workdir(tools, "gnu")
    run_script(tools, work, "./gnu-tools.sh", "report")
    report = {p.name: p.read_text() for p in (host / "report").iterdir()}
    assert re.fullmatch(r"/tmp/vmroot-[A-Za-z0-9]{5}\n", report["mktemp"])
    assert report["arch"] == "x86_64\n"
    # Each one the build root's own program, none of them busybox's applet.
    commands = report["commands"].split()
    assert len(commands) == 12 and not any(c.startswith("/hshelper") for c in commands)
    assert [line.split(" (")[0] for line in report["versions"].splitlines()] == [
        "tar", "sed", "find"]
    assert report["find"].splitlines() == [
        "-rw-r----- 640 root etc/deep/os-release", "drwxr-xr-x 755 root etc",
        "drwxr-xr-x 755 root etc/deep", "drwxr-xr-x 755 root usr",
        "drwxr-xr-x 755 root usr/lib", "drwxr-xr-x 755 root usr/lib/deep"]
    assert report["stat"].split(" /")[0] == "640 root:root regular file"
    assert report["sed"] == "ID=imagebuilder\n"
    table = json.loads(report["sfdisk.json"])["partitiontable"]
    assert [(p["size"], p["name"]) for p in table["partitions"]] == [
        (32768, "data"), (94208, "rest")]
    (disk,) = json.loads(report["lsblk.json"])["blockdevices"]
    assert (disk["type"], disk["pttype"], disk["size"]) == ("loop", "gpt", 64 << 20)
    first, rest = disk["children"]
    blkid = dict(line.split("=", 1) for line in report["blkid"].splitlines())
    assert (blkid["TYPE"], blkid["LABEL"], blkid["PARTLABEL"]) == ("ext4", "gnudata", "data")
    # lsblk's properties come from udev's database, which hshelper keeps.
    assert (first["fstype"], first["label"], first["uuid"], first["partlabel"]) == (
        "ext4", "gnudata", blkid["UUID"], "data")
    assert (rest["fstype"], rest["partlabel"]) == (None, "rest")
    assert report["lsblk-uuid"] == blkid["UUID"] + "\n"


def test_partition_rescans_and_disk_links(tools, tmp_path):
    work, host = workdir(tools, "links")
    proc = run_script(tools, work, "./devlinks.sh", "links.img")
    out = proc.stdout.decode()
    for line in ("partprobe: p1 p2", "blockdev --rereadpt: p3", "partx -u: p4",
                 "by-label after settle: /dev/loop0p1",
                 "by-uuid without settle: /dev/loop0p2"):
        assert line in out, out
    image = host / "links.img"
    layout = imagecheck.layout(image)
    assert [p.name for p in layout.partitions] == ["first", "second", "third", "fourth"]
    parts = [imagecheck.extract(image, p, tmp_path / f"p{i}")
             for i, p in enumerate(layout.partitions, 1)]
    ids = [imagecheck.probe(p) for p in parts]
    assert [i.get("TYPE") for i in ids] == ["ext4", "vfat", "swap", None]
    check_fs(parts[0], "ext4")
    check_fs(parts[1], "vfat")
    assert imagecheck.ext_cat(parts[0], "/fstab.generated").split("\n")[:4] == [
        f"/dev/disk/by-uuid/{ids[0]['UUID']} / ext4 defaults 0 1",
        f"/dev/disk/by-uuid/{ids[1]['UUID']} /boot/efi vfat umask=0077 0 2",
        f"/dev/disk/by-uuid/{ids[2]['UUID']} none swap sw 0 0",
        f"PARTUUID={layout.partitions[3].uuid.lower()} /srv ext4 defaults,nofail 0 2"]


@pytest.mark.xfail(strict=True, reason="9P2000.L has no fallocate: the shared working "
                   "directory answers EOPNOTSUPP (truncate, dd seek= or fallocate -x work)")
def test_fallocate_in_the_working_directory(tools):
    work, host = workdir(tools, "fallocate")
    (host / "alloc.sh").write_text("#!/bin/sh\nset -e\nfallocate -l 16M disk.img\n")
    own(host / "alloc.sh").chmod(0o755)
    run_script(tools, work, "./alloc.sh")
    assert (host / "disk.img").stat().st_size == 16 << 20


# A vmdb2 spec as its users write one: a GPT image with an ESP and a root, filled from a
# root tarball (vmdb2 skips debootstrap when --rootfs-tarball names an existing one).
VMDB2_SPEC = """\
steps:
  - mkimg: "{{ output }}"
    size: 160M
  - mklabel: gpt
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 1M
    end: 33M
    tag: efi
  - mkpart: primary
    device: "{{ output }}"
    start: 33M
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: vfat
    partition: efi
  - mkfs: ext4
    partition: root
    label: vmdb2root
  - mount: root
  - mount: efi
    mount-on: root
    dirname: /boot/efi
  - unpack-rootfs: root
  - debootstrap: bookworm
    mirror: http://deb.debian.org/debian
    target: root
    unless: rootfs_unpacked
  - fstab: root
  - chroot: root
    shell: |
      uname -m > /etc/made-in-chroot
      ls /boot >> /etc/made-in-chroot
  - shell: |
      echo from-the-host-side > "$ROOT/boot/efi/note.txt"
    root-fs: root
"""


def test_vmdb2_builds_an_image_from_its_spec(tools, tmp_path):
    work, host = workdir(tools, "vmdb2")
    own(chroot_tarball(tools, host / "root.tar"))
    (host / "image.vmdb").write_text(VMDB2_SPEC)
    own(host / "image.vmdb")
    proc = helper_run(tools, work, "vmdb2", "--rootfs-tarball", "root.tar",
                      "--output", "image.img", "--verbose", "image.vmdb")
    assert proc.returncode == 0, output(proc)
    assert "All went fine." in output(proc)
    image = host / "image.img"
    assert image.stat().st_uid == chroot.BUILD_UID
    assert image.stat().st_size == 160 * 2**20

    layout = imagecheck.layout(image)
    assert layout.label == "gpt"
    efi, root = layout.partitions
    # parted's "33M" is 33 MB give or take half of one, aligned: 31 MiB.
    assert (efi.start, root.start) == (2048, 31 * 2048)
    efipart = imagecheck.extract(image, efi, tmp_path / "efi.fs")
    rootpart = imagecheck.extract(image, root, tmp_path / "root.fs")
    check_fs(efipart, "vfat")
    check_fs(rootpart, "ext4")
    efi_id, root_id = imagecheck.probe(efipart), imagecheck.probe(rootpart)
    assert (efi_id["TYPE"], root_id["TYPE"], root_id["LABEL"]) == ("vfat", "ext4",
                                                                   "vmdb2root")
    fstab = imagecheck.ext_cat(rootpart, "/etc/fstab").split()
    assert f"UUID={root_id['UUID']}" in fstab and f"UUID={efi_id['UUID']}" in fstab
    # The chroot step ran the tarball's own programs; /boot/efi was mounted in it.
    assert imagecheck.ext_cat(rootpart, "/etc/made-in-chroot").split() == ["x86_64", "efi"]
    note = subprocess.run(["mtype", "-i", str(efipart), "::note.txt"], capture_output=True,
                          text=True, check=True).stdout
    assert note == "from-the-host-side\n"

"""The host fill of ``--recipe mkimage``: a tarball's root tree written into ext4 on the
host by the build user (hshelper.tarfs, hshelper.ext4fill, plugins/mkimage.py).

The proof is a comparison with the guest's way: GNU tar run as root into a fresh ext4
(what mkimage.sh does in the VM), both filesystems loop-mounted on the host and walked
entry by entry. The fill itself runs unprivileged in the bookworm build root."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import chroot
import imagecheck
import pytest
from hshelper.plugins import mkimage

from hshelper import ext4fill, imagediff, reproducible, tarfs
from hshelper.errors import HshelperError

CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep


def _member(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE,
            mode: int = 0o644, uid: int = 0, gid: int = 0, data: bytes = b"",
            **extra) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    info.mtime = 1_700_000_000 + len(tf.getnames())
    for key, value in extra.items():
        setattr(info, key, value)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if data else None)


def crafted_tarball(path: Path, acl: bool = False) -> Path:
    """Every kind of entry a root tarball has, with the metadata an unprivileged
    unpack loses: foreign and large owners, setuid, unreadable modes, device nodes,
    a FIFO, a capability xattr, hard and symbolic links, quotes in a name, implicit
    parent directories, and a member given twice."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _member(tf, "./", tarfile.DIRTYPE, 0o755)
        _member(tf, "./etc", tarfile.DIRTYPE, 0o755)
        _member(tf, "./etc/shadow", mode=0o640, gid=42, data=b"root:*:1::::::\n")
        _member(tf, "./usr/bin/su", mode=0o4755, data=b"\x7fELF pretend\n")  # implicit parents
        _member(tf, "./usr/bin/su-again", tarfile.LNKTYPE, linkname="./usr/bin/su")
        _member(tf, "./usr/bin/ping", mode=0o755, data=b"ping\n", pax_headers={
            "SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8",
                                                                  "surrogateescape")})
        _member(tf, "./usr/lib", tarfile.DIRTYPE, 0o755)
        _member(tf, "./lib", tarfile.SYMTYPE, 0o777, linkname="usr/lib")
        _member(tf, './home/odd "quoted" name', mode=0o600, uid=1000, gid=1000, data=b"q\n")
        _member(tf, "./secret", mode=0o000, data=b"nobody reads me\n")
        _member(tf, "./ro", tarfile.DIRTYPE, 0o555)
        _member(tf, "./ro/inside", mode=0o444, data=b"inside\n")
        _member(tf, "./big", tarfile.DIRTYPE, 0o700, uid=70000, gid=80000)
        _member(tf, "./big/file", mode=0o2750, uid=70000, gid=80000, data=b"big\n")
        _member(tf, "./dev", tarfile.DIRTYPE, 0o755)
        _member(tf, "./dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
        _member(tf, "./dev/loop0", tarfile.BLKTYPE, 0o660, gid=6, devmajor=7, devminor=0)
        _member(tf, "./run", tarfile.DIRTYPE, 0o755)
        _member(tf, "./run/initctl", tarfile.FIFOTYPE, 0o600)
        _member(tf, "./dup", data=b"old\n")
        _member(tf, "./dup", mode=0o600, data=b"new\n")
        if acl:
            _member(tf, "./acl", data=b"acl\n", pax_headers={
                "SCHILY.acl.access": "user::rw-,user:1000:r--,group::r--,mask::r--,other::---"})
    os.chown(path, chroot.BUILD_UID, chroot.BUILD_UID)
    return path


def reference_fs(tarball: Path, image: Path, mnt: Path) -> None:
    """What the guest does: mkfs.ext4 and GNU tar as root."""
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(image)], check=True)
    with imagecheck.loop_mounted(image, mnt, readonly=False):
        subprocess.run(["tar", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "-xf", str(tarball), "-C", str(mnt)], check=True)


def host_fill_in_root(root: Path, guest_dir: str, tarball: str, image: str,
                      epoch: int | None = None) -> str:
    """ext4fill.fill run by the build user inside the build root; its stdout. With
    ``epoch``, a reproducible filesystem (fixed UUID and hash seed)."""
    ids = (f"'11111111-2222-4333-8444-555555555555', (), "
           f"'11111111-2222-4333-8444-666666666666', {epoch}" if epoch is not None
           else "str(uuid.uuid4())")
    code = ("import sys, uuid; sys.path.insert(0, '/opt/hshelper')\n"
            "from pathlib import Path\nfrom hshelper import ext4fill\n"
            f"img = Path({image!r})\n"
            "with open(img, 'wb') as fh: fh.truncate(64 << 20)\n"
            f"fs = ext4fill.Ext4(img, 0, 64 << 20, 'root', {ids})\n"
            f"print(ext4fill.fill(Path({tarball!r}), fs, img.parent))\n")
    proc = chroot.run(root, ["python3", "-c", code], cwd=guest_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


# ------------------------------------------------------------------ pure functions


def test_normalize_member_names():
    assert tarfs.normalize("./usr/bin/") == "usr/bin"
    assert tarfs.normalize("/etc//passwd") == "etc/passwd"
    assert tarfs.normalize("./") == ""
    with pytest.raises(tarfs.UnsafeMember):
        tarfs.normalize("usr/../../etc/passwd")


def test_unsupported_entries():
    seen = {"": tarfs.Entry("", "dir", 0o755, 0, 0, 0.0),
            "lib": tarfs.Entry("lib", "symlink", 0o777, 0, 0, 0.0, "usr/lib"),
            "dev/null": tarfs.Entry("dev/null", "chr", 0o666, 0, 0, 0.0, "", 1, 3)}
    plain = tarfs.Entry("etc/passwd", "file", 0o644, 0, 0, 0.0)
    assert tarfs.unsupported(plain, seen) is None
    through_link = tarfs.Entry("lib/x.so", "file", 0o644, 0, 0, 0.0)
    assert "symlink" in tarfs.unsupported(through_link, seen)
    link_to_dev = tarfs.Entry("dev/zero", "hardlink", 0, 0, 0, 0.0, "dev/null")
    assert "chr" in tarfs.unsupported(link_to_dev, seen)
    acl = tarfs.Entry("a", "file", 0o644, 0, 0, 0.0, acl=True)
    assert "ACL" in tarfs.unsupported(acl, seen)
    newline = tarfs.Entry("a\nb", "file", 0o644, 0, 0, 0.0)
    assert "newline" in tarfs.unsupported(newline, seen)


def test_debugfs_script_writes_only_what_differs():
    entries = [
        tarfs.Entry("", "dir", 0o755, 0, 0, 0.0),
        tarfs.Entry("mine", "file", 0o644, 65534, 65534, 0.0),
        tarfs.Entry('a "b"', "file", 0o4755, 0, 0, 0.0),  # the host keeps setuid
        tarfs.Entry("secret", "file", 0o000, 0, 0, 0.0),  # the host keeps it readable
        tarfs.Entry("dev/null", "chr", 0o666, 0, 0, 5.0, "", 1, 3),
        tarfs.Entry("bin/ping", "file", 0o755, 0, 0, 0.0, xattrs=(("security.capability",
                                                                    b"x"),)),
        tarfs.Entry("bin/ping6", "hardlink", 0o755, 0, 0, 0.0, "bin/ping"),
    ]
    script = tarfs.debugfs_script(entries, {("bin/ping", "security.capability"): "/v/0"},
                                  (65534, 65534)).splitlines()
    assert script[:4] == ["cd /", "sif / uid 0", "sif / gid 0", "sif / mode 040755"]
    assert not any('"mine"' in line for line in script)  # owner and mode already right
    assert 'sif "a ""b""" uid 0' in script
    assert not any(line.startswith('sif "a ""b""" mode') for line in script)
    assert 'sif "secret" mode 0100000' in script
    assert script[script.index('cd "/dev"') + 1] == 'mknod "null" c 1 3'
    assert 'sif "null" mode 020666' in script
    assert 'ea_set -f "/v/0" "ping" "security.capability"' in script
    assert not any("ping6" in line for line in script)


def test_debugfs_script_of_a_reproducible_fill_dates_every_inode():
    entries = [tarfs.Entry("", "dir", 0o755, 0, 0, 0.0),
               tarfs.Entry("etc/motd", "file", 0o644, 65534, 65534, 9.0),
               tarfs.Entry("dev/null", "chr", 0o666, 0, 0, 5.0, "", 1, 3),
               tarfs.Entry("etc/motd2", "hardlink", 0, 0, 0, 0.0, "etc/motd")]
    script = tarfs.debugfs_script(entries, {}, (65534, 65534), epoch=1000).splitlines()
    assert [line for line in script if "ctime" in line] == [
        "sif / ctime @1000", 'sif "null" ctime @1000', 'sif "motd" ctime @1000']
    assert not any("ctime" in line for line in tarfs.debugfs_script(
        entries, {}, (65534, 65534)).splitlines())
    tree = tarfs.Tree(now=5e9, epoch=1000)
    assert tree.entries[""].mtime == 1000  # an implicit directory: made "now"
    late = tree.clamped(tarfs.Entry("a", "file", 0o644, 0, 0, 2000.0))
    early = tree.clamped(tarfs.Entry("b", "file", 0o644, 0, 0, 500.0))
    assert (late.mtime, early.mtime) == (1000, 500)
    assert tree.times(early) == (1000, 500)  # access time: the epoch
    assert tarfs.Tree(now=7.0).times(early) == (500, 500)


def test_parse_and_check_jobs():
    job = mkimage.parse_job("mkimage", ["--esp-size", "100MiB", "--sha256", "root.tar",
                                        "disk.img"])
    assert (job.root, job.output, job.table, job.root_index) == ("root.tar", "disk.img",
                                                                 "gpt", 3)
    assert mkimage.parse_job("mkimage", ["--help"]) is None
    assert mkimage.parse_job("mkimage", ["--frobnicate", "r", "o"]) is None
    assert mkimage.parse_job("mkimage", ["root.tar"]) is None
    loop = mkimage.parse_job("mkimage-loop", ["--size", "1G", "--seed", "x", "r", "o"])
    assert loop.get("--seed") == "x" and loop.table == "gpt"
    for argv, words in ((["--fs", "ext5"], "--fs must be"), (["--table", "apm"], "--table"),
                        (["--bootloader", "lilo"], "--bootloader"),
                        (["--table", "mbr", "--bootloader", "grub"], "needs --table gpt"),
                        (["--esp-size", "lots"], "--esp-size"),
                        (["--size", "12 apples"], "bad size"),
                        (["--root-uuid", "x"], "--root-uuid"),
                        (["--table", "mbr", "--root-partuuid", "1234-01"], "DISKID-01"),
                        (["--esp-id", "xyz"], "--esp-id"),
                        (["--root-sha256", "abc"], "--root-sha256")):
        with pytest.raises(HshelperError) as err:
            mkimage.check_job(mkimage.parse_job("mkimage", [*argv, "r", "o"]))
        assert err.value.status == 2 and words in str(err.value), (argv, str(err.value))
    mkimage.check_job(mkimage.parse_job("mkimage-mbr", ["--root-partuuid", "0badcafe-01",
                                                        "--esp-id", "0BADCAFE", "r", "o"]))
    assert [mkimage.esp_bytes(t) for t in ("256MiB", "100M", "1G", "2048", "1MB", "x")] == \
        [256 << 20, 100 << 20, 1 << 30, 2048 * 512, 10**6, None]


def test_room_for_the_root_is_checked_up_front():
    gpt = mkimage.parse_job("mkimage", ["--bootloader", "none", "r", "o"])
    with pytest.raises(HshelperError) as err:  # issue 13: the default ESP fills 256M
        mkimage.check_room(gpt, 256 << 20)
    assert err.value.status == 2 and "no room for the root" in str(err.value)
    mkimage.check_room(gpt, 300 << 20)
    mbr = mkimage.parse_job("mkimage-mbr", ["r", "o"])
    mkimage.check_room(mbr, 16 << 20)
    # A lower bound of what ext4 needs: 48 MiB of file cannot fit 42 MiB.
    big = ext4fill.Usage((48 << 20,), 2, 3)
    assert ext4fill.room_problem(big, 42 << 20) == (
        "the root tree (48 MiB in 3 entries) needs at least 55 MiB of ext4, more than the "
        "42 MiB root partition")
    assert ext4fill.room_problem(ext4fill.Usage((30 << 20,), 2, 3), 42 << 20) is None
    # Many empty files need inodes, not blocks: left to mke2fs (its message is shown).
    assert ext4fill.room_problem(ext4fill.Usage((0,) * 20000, 1, 20001), 42 << 20) is None
    assert ext4fill.journal_blocks(262144) == 8192 and ext4fill.journal_blocks(20480) == 1024


def test_identifiers_given_derived_or_new():
    job = mkimage.parse_job("mkimage", ["--root-uuid", "5b5c0d3e-0000-4000-8000-000000000001",
                                        "--esp-id", "0badcafe", "r", "o"])
    ids = mkimage.identifiers(job)
    assert ids.root_uuid == "5b5c0d3e-0000-4000-8000-000000000001" and ids.esp_id == "0BADCAFE"
    assert uuid.UUID(ids.disk) and ids.disk != mkimage.identifiers(job).disk  # new each time
    repro = reproducible.Settings("seed", 1700000000, "--seed")
    derived = reproducible.identifiers("seed", "ab" * 32, "gpt")
    again = mkimage.identifiers(job, repro, "ab" * 32)
    assert (again.disk, again.root_partuuid, again.hash_seed) == (
        derived.disk, derived.root_partuuid, derived.hash_seed)
    assert again.root_uuid == ids.root_uuid  # what the command line gives wins
    mbr = mkimage.parse_job("mkimage-mbr", ["--root-partuuid", "0badcafe-01", "r", "o"])
    assert mkimage.identifiers(mbr, repro, "").disk == "0badcafe"


@pytest.mark.skipif(not shutil.which("sfdisk", path="/usr/sbin:/sbin"),
                    reason="sfdisk not installed (scripts/setup installs fdisk)")
def test_partition_scripts_make_the_tables_they_promise(tmp_path):
    """The host's sfdisk input, fed to sfdisk: the table read back has the identifiers,
    types, names and flags the recipe gives (the boot tests use the same tables)."""
    ids = reproducible.identifiers("seed", "", "gpt")
    image = tmp_path / "gpt.img"
    subprocess.run(["truncate", "-s", "300M", str(image)], check=True)
    subprocess.run(["/usr/sbin/sfdisk", "-q", str(image)], check=True, text=True,
                   input=mkimage.sfdisk_script("gpt", "100MiB", ids))
    lay = imagecheck.layout(image)
    assert (lay.label, lay.label_id.lower()) == ("gpt", ids.disk)
    esp, rootp = lay.partitions
    assert (esp.type, esp.uuid.lower(), esp.name) == (mkimage.ESP_TYPE, ids.esp_part, "esp")
    assert esp.size * 512 == 100 << 20
    assert (rootp.type, rootp.uuid.lower(), rootp.name) == (mkimage.ROOT_TYPE,
                                                            ids.root_partuuid, "root")
    image = tmp_path / "mbr.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    mbr = reproducible.identifiers("seed", "", "mbr")
    subprocess.run(["/usr/sbin/sfdisk", "-q", str(image)], check=True, text=True,
                   input=mkimage.sfdisk_script("mbr", "", mbr))
    lay = imagecheck.layout(image)
    assert (lay.label, lay.label_id) == ("dos", f"0x{mbr.disk}")
    [part] = lay.partitions
    assert part.type == "83" and part.bootable and part.start == 2048
    assert [mkimage.fat32_cluster_sectors(m << 20) for m in (100, 256, 512, 9000)] == \
        [1, 1, 8, 16]


# ------------------------------------------------------------------ real tools


@pytest.mark.slow
def test_host_fill_matches_gnu_tar_as_root(root, tmp_path):
    """Unprivileged fill == root's GNU tar, entry by entry; fsck clean; no leftovers."""
    guest = chroot.fresh_dir(root, "hostfill")
    host = root / guest.lstrip("/")
    tarball = crafted_tarball(host / "root.tar")
    out = host_fill_in_root(root, guest, "root.tar", "fill.img")
    assert "entries of" in out
    assert sorted(p.name for p in host.iterdir()) == ["fill.img", "root.tar"]
    assert imagecheck.fsck(host / "fill.img", "ext4").returncode == 0
    reference_fs(tarball, tmp_path / "ref.img", tmp_path / "ref")
    with imagecheck.loop_mounted(host / "fill.img", tmp_path / "a") as a, \
            imagecheck.loop_mounted(tmp_path / "ref.img", tmp_path / "b") as b:
        ours, theirs = imagecheck.tree_listing(a), imagecheck.tree_listing(b)
        # Parents no member names get the time they were made: not comparable.
        for implicit in ("usr", "usr/bin", "home"):
            ours[implicit] = ours[implicit][:4] + ours[implicit][5:]
            theirs[implicit] = theirs[implicit][:4] + theirs[implicit][5:]
        for lost in (ours.pop("lost+found"), theirs.pop("lost+found")):
            assert lost[:3] == (0o40700, 0, 0)
        assert ours == theirs
        assert ours["usr/bin/ping"][7] == (("security.capability", CAPABILITY),)
        assert ours["big/file"][1:3] == (70000, 80000)
        assert (os.stat(a).st_uid, os.stat(a).st_mode) == (0, 0o40755)


@pytest.mark.slow
def test_host_fill_refuses_acls_before_writing(root):
    guest = chroot.fresh_dir(root, "hostfill-acl")
    host = root / guest.lstrip("/")
    crafted_tarball(host / "root.tar", acl=True)
    code = ("import sys; sys.path.insert(0, '/opt/hshelper')\n"
            "from pathlib import Path\nfrom hshelper import ext4fill\n"
            "try:\n    ext4fill.scan(Path('root.tar'), 'tar')\n"
            "except ext4fill.Unsupported as err:\n    print('unsupported:', err)\n")
    proc = chroot.run(root, ["python3", "-c", code], cwd=guest)
    assert proc.stdout.decode() == "unsupported: acl: POSIX ACLs\n", proc.stderr.decode()
    assert sorted(p.name for p in host.iterdir()) == ["root.tar"]


@pytest.mark.slow
def test_reproducible_host_fill_gives_the_same_bytes(root, tmp_path):
    """The unprivileged fill twice, from the same tarball, at different times, into
    different directories (the unpacked copies get other change times, other inode
    numbers on the host): the same filesystem, byte for byte; fsck clean; every
    inode dated by the epoch."""
    images = []
    for name in ("hostfill-repro-a", "hostfill-repro-b"):
        guest = chroot.fresh_dir(root, name)
        host = root / guest.lstrip("/")
        crafted_tarball(host / "root.tar")
        out = host_fill_in_root(root, guest, "root.tar", "fill.img", epoch=1700000000)
        assert "entries of" in out
        images.append(host / "fill.img")
    assert images[0].read_bytes() == images[1].read_bytes(), imagediff.explain(*images)
    assert imagecheck.fsck(images[0], "ext4").returncode == 0
    stat = imagecheck.run(["debugfs", "-R", "stat /usr/bin/su", str(images[0])]).stdout
    for field in ("ctime", "atime", "crtime"):
        assert f"{field}: 0x6553f100:00000000" in stat, stat  # 1700000000
    assert "mtime: 0x" in stat and "Generation: 0" in stat
    features = imagecheck.run(["dumpe2fs", "-h", str(images[0])],
                              env={**os.environ, "TZ": "UTC0"}).stdout
    assert "has_journal" not in features  # the recipe adds it after its own writes
    assert "Filesystem created:       Tue Nov 14 22:13:20 2023" in features


@pytest.mark.slow
def test_reproducible_fill_from_a_directory(root, tmp_path):
    """A directory ROOT (mke2fs -d as it is, then dated by debugfs): two copies made
    at different times give the same filesystem; a modification time later than the
    epoch is clamped to it."""
    images = []
    for name in ("hostfill-dir-a", "hostfill-dir-b"):
        guest = chroot.fresh_dir(root, name)
        host = root / guest.lstrip("/")
        tree = host / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/hostname").write_text("dir\n")
        (tree / "future").write_text("later than the epoch\n")
        for path, when in ((tree / "etc/hostname", 1_600_000_000), (tree / "etc", 1_600_000_000),
                           (tree / "future", 1_800_000_000), (tree, 1_600_000_000)):
            os.utime(path, (when, when))
        subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(host)],
                       check=True)
        out = host_fill_in_root(root, guest, "tree", "fill.img", epoch=1700000000)
        assert "times by debugfs" in out
        images.append(host / "fill.img")
        time.sleep(1.1)
    assert images[0].read_bytes() == images[1].read_bytes(), imagediff.explain(*images)
    stat = imagecheck.run(["debugfs", "-R", "stat /future", str(images[0])]).stdout
    assert "mtime: 0x6553f100:00000000" in stat and "ctime: 0x6553f100:00000000" in stat
    assert imagecheck.fsck(images[0], "ext4").returncode == 0


def test_the_shipped_recipes_are_known_by_name_or_by_path_not_by_file_name(tmp_path):
    """The .part cleanup after a stopped VM is for the shipped recipes: by --recipe, or
    a copy of one run by path; not any script that happens to be called mkimage.sh."""
    from hshelper.model import RunSpec
    (tmp_path / "recipes").mkdir()
    shutil.copy(chroot.SRC / "recipes/mkimage-mbr.sh", tmp_path / "recipes")
    (tmp_path / "mkimage.sh").write_text("#!/bin/sh\n# my own image script\n")

    def recipe(argv, **extra):
        return mkimage._recipe_of(RunSpec(argv=argv, cwd=str(tmp_path), env=(), extra=extra))

    assert recipe(("recipes/mkimage-mbr.sh", "r", "o")) == "mkimage-mbr"
    assert recipe(("./mkimage.sh", "r", "o")) is None
    assert recipe(("/hshelper/recipes/mkimage-loop.sh",), recipe="mkimage-loop") == \
        "mkimage-loop"
    assert recipe(("true",)) is None

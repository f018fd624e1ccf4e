"""Reproducible images (issue 17): the same inputs give the same bytes.

The standard job, ``helper-run --recipe mkimage --size 1G root.tar disk.img`` with
SOURCE_DATE_EPOCH set, runs twice as the build user in the bookworm build root, in two
working directories one after the other; the raw images (and qcow2 copies, checksum
files) must be byte-identical, with the host fill, with both runs forced through the
guest fill, with the MBR recipe and with the loop recipe; each image boots to its
marker. When they differ, hshelper.imagediff says where. A changed seed or a changed
file in the tarball changes the image, in the places it should; without a seed or
SOURCE_DATE_EPOCH every image gets fresh identifiers.

The pure parts (the derivation, the FAT label's date) are checked without a VM."""

from __future__ import annotations

import filecmp
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import chroot
import imagecheck
import pytest
import test_recipes
from test_recipes import MARKER_APPEND, check_boot, helper_run, workdir

from hshelper import imagediff, reproducible

SDE = "1700000000"
slim_tar = test_recipes.slim_tar  # the fixture, shared


# ------------------------------------------------------------------ pure parts


def test_settings_from_seed_and_source_date_epoch():
    assert reproducible.settings(None, {}) is None
    assert reproducible.settings("", {}) is None
    only_sde = reproducible.settings(None, {"SOURCE_DATE_EPOCH": "1700000000"})
    assert (only_sde.seed, only_sde.epoch, only_sde.seed_from) == \
        ("1700000000", 1700000000, "SOURCE_DATE_EPOCH")
    only_seed = reproducible.settings("release-7", {}, "config")
    assert (only_seed.seed, only_seed.epoch, only_seed.seed_from) == \
        ("release-7", 315532800, "config")  # 1980-01-01T00:00:00Z
    both = reproducible.settings("s", {"SOURCE_DATE_EPOCH": "5"})
    assert (both.seed, both.epoch) == ("s", 5)
    for bad_seed, env in (("a\nb", {}), (None, {"SOURCE_DATE_EPOCH": "yesterday"})):
        with pytest.raises(reproducible.BadSetting):
            reproducible.settings(bad_seed, env)


def test_identifiers_depend_on_every_input():
    digest = "ab" * 32
    base = reproducible.identifiers("s", digest, "gpt")
    assert base == reproducible.identifiers("s", digest, "gpt")  # deterministic
    values = [base.disk, base.esp_part, base.root_partuuid, base.root_uuid, base.hash_seed]
    assert len(set(values)) == 5
    for value in values:
        assert value[14] == "4" and value[19] in "89ab", value  # RFC 4122 version 4 form
    assert len(base.esp_id) == 8 and base.esp_id == base.esp_id.upper()
    for other in (reproducible.identifiers("t", digest, "gpt"),
                  reproducible.identifiers("s", "cd" * 32, "gpt"),
                  reproducible.identifiers("s", "", "gpt")):
        assert other.root_uuid != base.root_uuid and other.disk != base.disk
    mbr = reproducible.identifiers("s", digest, "mbr")
    assert len(mbr.disk) == 8 and mbr.root_partuuid == f"{mbr.disk}-01"
    assert mbr.root_uuid != base.root_uuid


def test_fat_label_stamp_matches_what_mtools_writes(tmp_path):
    """The volume label entry, dated by hshelper, carries the same time and date words
    as a directory entry mtools writes with the same SOURCE_DATE_EPOCH."""
    if not shutil.which("mmd") or not shutil.which("mkfs.fat", path="/usr/sbin:/sbin"):
        pytest.skip("mtools or dosfstools not installed (scripts/setup installs them)")
    fat = tmp_path / "esp.img"
    subprocess.run(["truncate", "-s", "64M", str(fat)], check=True)
    subprocess.run(["/usr/sbin/mkfs.fat", "--invariant", "-F", "32", "-n", "ESP", "-i",
                    "0badcafe", str(fat)], check=True, capture_output=True)
    assert fat.read_bytes()[67:71] == bytes.fromhex("0badcafe")[::-1]  # -i still holds
    where, stamp = reproducible.fat_label_stamp(fat.read_bytes()[:512], int(SDE))
    with open(fat, "r+b") as fh:
        fh.seek(where)
        fh.write(stamp)
    subprocess.run(["mmd", "-i", str(fat), "::/EFI"], check=True,
                   env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": SDE, "TZ": "UTC0"})
    root = fat.read_bytes()[where - 13:where - 13 + 64]
    label, efi = root[:32], root[32:]
    assert label[:11] == b"ESP        " and label[11] == 0x08
    assert efi[:11] == b"EFI        " and efi[11] == 0x10
    for start, end in ((14, 20), (22, 26)):  # creation time, dates; modification
        assert label[start:end] == efi[start:end]
    assert imagecheck.run(["fsck.fat", "-n", str(fat)]).returncode == 0


# ------------------------------------------------------------------ real runs


def build(root: Path, name: str, *argv: str, env: dict | None = None,
          out: str = "disk.img") -> Path:
    """``helper-run ARGV`` in a fresh working directory; the directory on the host."""
    guest, host = workdir(root, name)
    proc = helper_run(root, *argv, cwd=guest, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (host / out).is_file()
    assert not list(host.glob("*.part")) and not list(host.glob(".hshelper-fill-*"))
    return host


def assert_same(a: Path, b: Path) -> None:
    """Byte-identical, or a failure that says where they differ."""
    assert filecmp.cmp(a, b, shallow=False), imagediff.explain(a, b)


def twice(root: Path, name: str, *argv: str, out: str = "disk.img") -> tuple[Path, Path]:
    """The same job twice with SOURCE_DATE_EPOCH, at different times, in different
    directories; both images must be byte-identical."""
    first = build(root, f"{name}-a", *argv, env={"SOURCE_DATE_EPOCH": SDE}, out=out)
    time.sleep(1.1)  # a second later: every clock-dated byte would move
    second = build(root, f"{name}-b", *argv, env={"SOURCE_DATE_EPOCH": SDE}, out=out)
    assert_same(first / out, second / out)
    return first, second


def derived(root: Path, tar: str, table: str) -> reproducible.Identifiers:
    digest = reproducible.file_sha256(root / tar.lstrip("/"))
    return reproducible.identifiers(SDE, digest, table)


def gpt_ids(image: Path, tmp: Path) -> tuple[str, str, str, str]:
    """(disk GUID, ESP GUID, root PARTUUID, root filesystem UUID), lower case."""
    lay = imagecheck.layout(image)
    root_img = imagecheck.extract(image, lay.partitions[1], tmp / "ids-root.img")
    return (lay.label_id.lower(), lay.partitions[0].uuid.lower(),
            lay.partitions[1].uuid.lower(), imagecheck.probe(root_img)["UUID"])


@pytest.mark.slow
@pytest.mark.vm
def test_host_fill_is_reproducible_and_boots(root, slim_tar, tmp_path):
    a, _b = twice(root, "repro-host", "--recipe", "mkimage", "--size", "1G",
                  "--append", MARKER_APPEND, slim_tar, "disk.img")
    ids = derived(root, slim_tar, "gpt")
    assert gpt_ids(a / "disk.img", tmp_path) == (ids.disk, ids.esp_part,
                                                ids.root_partuuid, ids.root_uuid)
    image = a / "disk.img"
    found = imagecheck.fsck(imagecheck.extract(image, imagecheck.layout(image).partitions[1],
                                               tmp_path / "root.img"), "ext4")
    assert found.returncode == 0, found.stdout
    lines = check_boot(image, "uefi", tmp_path / "console.log", ids.root_partuuid)
    assert any(line.endswith("esp BOOTX64.EFI") for line in lines), lines


@pytest.mark.slow
@pytest.mark.vm
def test_guest_fill_is_reproducible(root, slim_tar, tmp_path):
    """Both runs forced through the guest fill (mke2fs -d in the guest); the recipe
    derives the identifiers in sh exactly as hshelper.reproducible does in Python.
    (It boots as the host fill's image does: the same ESP, fstab and bootloader.)"""
    a, _b = twice(root, "repro-guest", "--guest-fill", "--recipe", "mkimage", "--size",
                  "1G", "--append", MARKER_APPEND, slim_tar, "disk.img")
    ids = derived(root, slim_tar, "gpt")
    assert gpt_ids(a / "disk.img", tmp_path) == (ids.disk, ids.esp_part,
                                                ids.root_partuuid, ids.root_uuid)
    image = a / "disk.img"
    esp, rootp = imagecheck.layout(image).partitions
    root_img = imagecheck.extract(image, rootp, tmp_path / "root.img")
    assert imagecheck.fsck(root_img, "ext4").returncode == 0
    assert imagecheck.fsck(imagecheck.extract(image, esp, tmp_path / "esp.img"),
                           "vfat").returncode == 0
    assert imagecheck.probe(tmp_path / "esp.img")["UUID"] == \
        f"{ids.esp_id[:4]}-{ids.esp_id[4:]}"
    assert f"UUID={ids.root_uuid} / ext4 " in imagecheck.ext_cat(root_img, "/etc/fstab")
    assert imagecheck.ext_exists(root_img, "/" + imagecheck.MARKER_PATH)


@pytest.mark.slow
@pytest.mark.vm
def test_mbr_recipe_is_reproducible_and_boots_with_bios(root, slim_tar, tmp_path):
    a, _b = twice(root, "repro-mbr", "--recipe", "mkimage-mbr", "--size", "1G",
                  "--append", MARKER_APPEND, slim_tar, "disk.img")
    ids = derived(root, slim_tar, "mbr")
    lay = imagecheck.layout(a / "disk.img")
    assert lay.label == "dos" and lay.label_id == f"0x{ids.disk}"
    assert lay.partitions[0].bootable and lay.partitions[0].type == "83"
    check_boot(a / "disk.img", "bios", tmp_path / "console.log", ids.root_partuuid)


@pytest.mark.slow
@pytest.mark.vm
def test_loop_recipe_is_reproducible_and_boots(root, slim_tar, tmp_path):
    a, _b = twice(root, "repro-loop", "--disk", f"{slim_tar},ro,name=src", "--recipe",
                  "mkimage-loop", "--size", "1G", "--bootloader", "grub", "--append",
                  MARKER_APPEND, "/dev/disk/hshelper/src", "disk.img")
    ids = derived(root, slim_tar, "gpt")
    assert gpt_ids(a / "disk.img", tmp_path)[2:] == (ids.root_partuuid, ids.root_uuid)
    check_boot(a / "disk.img", "uefi", tmp_path / "console.log", ids.root_partuuid)


def small_tarball(path: Path, hostname: bytes = b"one\n") -> Path:
    """A tiny root: /etc (hostname, fstab), /usr/share/note; owned by root."""
    with tarfile.open(path, "w") as tf:
        for name, data in (("etc/hostname", hostname), ("etc/fstab", b"# none\n"),
                           ("usr/share/note", b"x" * 5000)):
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
            tf.addfile(info, io.BytesIO(data))
    os.chown(path, chroot.BUILD_UID, chroot.BUILD_UID)
    return path


@pytest.mark.slow
@pytest.mark.vm
def test_copies_report_and_a_changed_input_and_plain_images(root, tmp_path):
    """A small job twice with a qcow2 copy and checksums, with the host fill and with
    the guest's: the same bytes; the report records the seed, SOURCE_DATE_EPOCH and
    ROOT's digest. Against the first: another seed
    changes the identifiers (GPT, FAT volume id, ext4 UUID) and not the files; one
    changed file in the tarball changes that file's block and, through the tarball's
    digest, the identifiers. Without a seed or SOURCE_DATE_EPOCH two runs of one job
    share no identifier."""
    src = chroot.fresh_dir(root, "repro-inputs-src")
    small_tarball(root / src.lstrip("/") / "one.tar")
    small_tarball(root / src.lstrip("/") / "two.tar", hostname=b"two\n")
    job = ["--recipe", "mkimage", "--size", "64M", "--esp-size", "20MiB", "--bootloader",
           "none"]
    env = {"SOURCE_DATE_EPOCH": SDE}
    # Twice with a qcow2 copy, checksums and a report: the same bytes everywhere.
    copies = ["--with", "qemu-img", "--report", "report.json", *job, "--qcow2",
              "disk.qcow2", "--sha256"]
    base = build(root, "repro-in-base", *copies, f"{src}/one.tar", "disk.img", env=env)
    time.sleep(1.1)
    again = build(root, "repro-in-again", *copies, f"{src}/one.tar", "disk.img", env=env)
    for name in ("disk.img", "disk.qcow2"):
        assert_same(base / name, again / name)
    for name in ("disk.img.sha256", "disk.qcow2.sha256"):
        assert (base / name).read_text() == (again / name).read_text()
    report = json.loads((base / "report.json").read_text())
    assert report["reproducible"] == {
        "seed": SDE, "seed_from": "SOURCE_DATE_EPOCH", "source_date_epoch": int(SDE),
        "epoch": int(SDE), "root_sha256": reproducible.file_sha256(
            root / src.lstrip("/") / "one.tar")}
    [disk] = [x for x in report["artifacts"] if x["kind"] == "disk"]
    assert disk["path"] == "disk.img"  # attached as disk.img.part, renamed when complete
    assert disk["sha256"] == (base / "disk.img.sha256").read_text().split()[0]
    # The same through the guest fill (its own image: mke2fs -d ran on another tree).
    guest = [build(root, f"repro-in-guest-{i}", "--guest-fill", *copies, f"{src}/one.tar",
                   "disk.img", env=env) for i in (1, 2)]
    for name in ("disk.img", "disk.qcow2", "disk.img.sha256", "disk.qcow2.sha256"):
        assert_same(guest[0] / name, guest[1] / name)

    # The seed from the configuration (the recipes' --seed is the same setting).
    seed = build(root, "repro-in-seed", "--set", "mkimage.seed=another", "--report",
                 "report.json", *job, f"{src}/one.tar", "disk.img", env=env)
    assert json.loads((seed / "report.json").read_text())["reproducible"]["seed_from"] == \
        "config"
    text = imagediff.explain(base / "disk.img", seed / "disk.img", limit=1000)
    assert "GPT primary header (LBA 1)" in text and "disk GUID" in text, text
    assert "FAT: boot sector" in text and "volume id" in text, text
    assert "ext4: superblock (primary)" in text and "s_uuid" in text, text
    assert "journal superblock" in text, text  # its UUID is the filesystem's
    # The files stay: only checksums (seeded by the UUID) change in their inodes.
    assert not any("data: block" in line and "/etc/hostname" in line
                   for line in text.splitlines()), text
    assert all("i_checksum" in line for line in text.splitlines()
               if "inode table" in line and "/etc/hostname" in line), text

    other = build(root, "repro-in-file", *job, f"{src}/two.tar", "disk.img", env=env)
    text = imagediff.explain(base / "disk.img", other / "disk.img", limit=1000)
    assert any("data: block" in line and "/etc/hostname" in line
               for line in text.splitlines()), text
    assert "s_uuid" in text, text  # the tarball's digest is an input of the identifiers

    plain = [build(root, f"repro-in-plain-{i}", "--report", "report.json", *job,
                   f"{src}/one.tar", "disk.img") for i in (1, 2)]
    ids = [gpt_ids(p / "disk.img", tmp_path) for p in plain]
    assert not set(ids[0]) & set(ids[1]), ids
    assert json.loads((plain[0] / "report.json").read_text())["reproducible"] is None

"""hshelper.imagediff: where two images differ, named by structure.

The images are made with the real tools (sfdisk, mkfs.vfat, mtools, mke2fs, debugfs,
tune2fs, qemu-img) on plain files, as the build user would; then one thing is changed
in a copy with a real tool, and the explanation must name that thing: the GPT header
field, the FAT directory entry or file, the ext4 superblock field, the inode and its
path, the data block and its file, the journal."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hshelper import imagediff

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
TOOLS = ("sfdisk", "mkfs.vfat", "mke2fs", "debugfs", "tune2fs", "mcopy", "mmd", "qemu-img")


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A 96 MiB GPT image: a FAT32 ESP with a directory and a file, an ext4 root with
    a journal and a few files."""
    missing = [t for t in TOOLS if not shutil.which(t, path="/usr/sbin:/sbin:/usr/bin")]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup installs them)")
    tmp = tmp_path_factory.mktemp("imagediff")
    img = tmp / "a.img"
    run("truncate", "-s", "96M", str(img))
    run("sfdisk", "-q", str(img), input=f"label: gpt\nsize=40MiB, type={ESP_TYPE}, "
        'name="esp"\ntype=L, name="root"\n')
    esp, root = imagediff_partitions(img)
    run("mkfs.vfat", "-F", "32", "-n", "ESP", f"--offset={esp[0] // 512}", str(img),
        str(esp[1] // 1024))
    payload = tmp / "BOOTX64.EFI"
    payload.write_bytes(b"\x4d\x5a" + bytes(range(256)) * 40)
    fat = f"{img}@@{esp[0]}"
    run("mmd", "-i", fat, "::/EFI", "::/EFI/BOOT")
    run("mcopy", "-i", fat, str(payload), "::/EFI/BOOT/BOOTX64.EFI")
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/fstab").write_text("# fstab\n" * 100)
    (tree / "etc/hostname").write_text("a\n")
    run("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={root[0]}", "-d", str(tree),
        str(img), f"{root[1] // 1024}k")
    return img


def imagediff_partitions(img: Path) -> list[tuple[int, int]]:
    import mmap
    with open(img, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return [(start, size) for start, size, _ in imagediff.table_regions(m)[1]]


def changed(image: Path, tmp: Path, *argv: str, part: int | None = None, **kw) -> Path:
    """A copy of ``image`` with ``argv`` run on it (IMG in argv is the copy; with
    ``part``, the copy's partition ``part`` as debugfs/tune2fs name it)."""
    copy = tmp / "b.img"
    shutil.copyfile(image, copy)
    target = str(copy)
    if part is not None:
        target = f"{copy}?offset={imagediff_partitions(copy)[part][0]}"
    run(*[target + a[3:] if a.startswith("IMG") else a for a in argv], **kw)
    return copy


def test_identical_images_say_nothing(image, tmp_path):
    copy = tmp_path / "b.img"
    shutil.copyfile(image, copy)
    assert imagediff.explain(image, copy) == ""
    assert imagediff.main([str(image), str(copy)]) == 0


def test_gpt_disk_guid(image, tmp_path):
    copy = changed(image, tmp_path, "sfdisk", "-q", "--disk-id", "IMG",
                   "11111111-2222-4333-8444-555555555555")
    text = imagediff.explain(image, copy)
    assert "GPT primary header (LBA 1) (at byte 528" in text  # its CRC first
    assert "disk GUID" in text and "header CRC32" in text
    assert "GPT backup header" in text
    assert "partition" not in text  # nothing else moved
    assert imagediff.main([str(image), str(copy)]) == 1


def test_fat_file_and_directory_entry(image, tmp_path):
    other = tmp_path / "new.efi"
    other.write_bytes(b"\x4d\x5a" + bytes(reversed(range(256))) * 40)  # same size
    esp = imagediff_partitions(image)[0][0]
    copy = changed(image, tmp_path, "mcopy", "-o", "-i", f"IMG@@{esp}", str(other),
                   "::/EFI/BOOT/BOOTX64.EFI",
                   env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": "1500000000"})
    text = imagediff.explain(image, copy)
    line = next(x for x in text.splitlines() if "directory /EFI/BOOT: entry" in x)
    assert "modification time" in line and "modification date" in line
    assert "partition 1 (esp) FAT: FAT #1: sector 0 (clusters 0-127)" in text

    # The same file's bytes changed where they are: named by the file.
    import mmap
    with open(image, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        data = next(r for r in imagediff.image_regions(m)
                    if r.name.endswith("file /EFI/BOOT/BOOTX64.EFI (data)"))
    shutil.copyfile(image, copy)
    with open(copy, "r+b") as fh:
        fh.seek(data.start + 100)
        fh.write(b"\xff\xff")
    text = imagediff.explain(image, copy)
    assert text.splitlines()[1].startswith(
        "  partition 1 (esp) FAT: file /EFI/BOOT/BOOTX64.EFI (data)"), text
    assert len(text.splitlines()) == 2


def test_ext4_superblock_inode_and_data_block(image, tmp_path):
    copy = changed(image, tmp_path, "tune2fs", "-U", "11111111-2222-4333-8444-555555555555",
                   "IMG", part=1)
    text = imagediff.explain(image, copy)
    assert "partition 2 (root) ext4: superblock (primary)" in text
    assert "s_uuid" in text and "s_checksum" in text
    assert "superblock (backup in group 1)" in text

    script = tmp_path / "cmds"
    script.write_text("sif /etc/hostname ctime @1500000000\n")
    copy = changed(image, tmp_path, "debugfs", "-w", "-f", str(script), "IMG", part=1)
    text = imagediff.explain(image, copy)
    line = next(x for x in text.splitlines() if "inode table" in x)
    assert "(/etc/hostname)" in line and "i_ctime" in line and "i_mtime" not in line

    fstab = tmp_path / "fstab"
    fstab.write_text("# FSTAB\n" * 100)  # same size: the same blocks, other bytes
    script.write_text(f"rm /etc/fstab\nwrite {fstab} /etc/fstab\n")
    copy = changed(image, tmp_path, "debugfs", "-w", "-f", str(script), "IMG", part=1)
    text = imagediff.explain(image, copy)
    assert any(" ext4: data: block " in x and "/etc/fstab)" in x
               for x in text.splitlines()), text


def test_ext4_journal(image, tmp_path):
    import mmap
    with open(image, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        regions = imagediff.image_regions(m)
    journal = next(r for r in regions if r.name.endswith("ext4: journal superblock"))
    copy = tmp_path / "b.img"
    shutil.copyfile(image, copy)
    with open(copy, "r+b") as fh:
        fh.seek(journal.start + 24)  # s_sequence
        fh.write(b"\x12\x34")
    text = imagediff.explain(image, copy)
    assert "ext4: journal superblock" in text and "s_sequence" in text


def test_qcow2_images_are_compared_by_their_guest_data(image, tmp_path):
    copy = changed(image, tmp_path, "tune2fs", "-U", "11111111-2222-4333-8444-555555555555",
                   "IMG", part=1)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for raw, qcow in ((image, a), (copy, b)):
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    text = imagediff.explain(a, b)
    assert "the guest data:" in text
    guest = text.split("the guest data:", 1)[1]
    assert "superblock (primary)" in guest and "s_uuid" in guest


def test_mbr_fields_by_name():
    regions, parts = imagediff.table_regions(bytearray(510) + b"\x55\xaa")
    assert parts == [] and regions[0].name == "MBR"
    described = regions[0].describe(440, 444)
    assert described == [("MBR", ["disk signature"], 4)]

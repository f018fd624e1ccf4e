"""Where two disk images differ: which partition, which structure, which field.

    python3 -m hshelper.imagediff A.img B.img [--limit N]

For checking reproducible images (docs/recipes.md): when a rebuild is not byte for
byte the original, a list of byte offsets says nothing; this names the place instead.
It reads the layout of the first image (MBR or GPT; ext4 and FAT filesystems inside
the partitions) and describes each range of differing bytes by the structure holding
it: the GPT header and its fields, a partition entry, the FAT boot sector, a FAT, a
directory entry (with its path) or a file's cluster, an ext4 superblock copy, a group
descriptor, a bitmap, an inode (by number, and by path when debugfs can name it), the
journal, or a data block (and the file it belongs to). qcow2 images are compared by
their header and then by the guest data they hold (qemu-img convert).

Pure reading: :func:`differences` returns :class:`Finding` values; :func:`explain`
turns them into lines. Exit status of the command: 0 same, 1 different, 2 error.
"""

from __future__ import annotations

import argparse
import bisect
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
CHUNK = 1 << 20
BLOCK = 4096

# (offset, size, name) tables of the on-disk formats, from their public specifications.
MBR_FIELDS = [(0, 440, "boot code"), (440, 4, "disk signature"), (444, 2, "reserved"),
              *[(446 + 16 * i, 16, f"partition entry {i + 1}") for i in range(4)],
              (510, 2, "boot signature")]
GPT_HEADER = [(0, 8, "signature"), (8, 4, "revision"), (12, 4, "header size"),
              (16, 4, "header CRC32"), (20, 4, "reserved"), (24, 8, "this LBA"),
              (32, 8, "other header LBA"), (40, 8, "first usable LBA"),
              (48, 8, "last usable LBA"), (56, 16, "disk GUID"), (72, 8, "entries LBA"),
              (80, 4, "number of entries"), (84, 4, "entry size"),
              (88, 4, "entries CRC32")]
GPT_ENTRY = [(0, 16, "type GUID"), (16, 16, "unique GUID"), (32, 8, "first LBA"),
             (40, 8, "last LBA"), (48, 8, "attributes"), (56, 72, "name")]
EXT4_SUPER = [
    (0, 4, "s_inodes_count"), (4, 4, "s_blocks_count"), (8, 4, "s_r_blocks_count"),
    (12, 4, "s_free_blocks_count"), (16, 4, "s_free_inodes_count"),
    (20, 4, "s_first_data_block"), (24, 4, "s_log_block_size"),
    (28, 4, "s_log_cluster_size"), (32, 4, "s_blocks_per_group"),
    (36, 4, "s_clusters_per_group"), (40, 4, "s_inodes_per_group"), (44, 4, "s_mtime"),
    (48, 4, "s_wtime"), (52, 2, "s_mnt_count"), (54, 2, "s_max_mnt_count"),
    (56, 2, "s_magic"), (58, 2, "s_state"), (60, 2, "s_errors"),
    (62, 2, "s_minor_rev_level"), (64, 4, "s_lastcheck"), (68, 4, "s_checkinterval"),
    (72, 4, "s_creator_os"), (76, 4, "s_rev_level"), (80, 4, "s_def_resuid/gid"),
    (84, 4, "s_first_ino"), (88, 2, "s_inode_size"), (90, 2, "s_block_group_nr"),
    (92, 12, "s_feature_*"), (104, 16, "s_uuid"), (120, 16, "s_volume_name"),
    (136, 64, "s_last_mounted"), (200, 4, "s_algorithm_usage_bitmap"),
    (204, 2, "s_prealloc_*"), (206, 2, "s_reserved_gdt_blocks"),
    (208, 16, "s_journal_uuid"), (224, 4, "s_journal_inum"), (228, 4, "s_journal_dev"),
    (232, 4, "s_last_orphan"), (236, 16, "s_hash_seed"), (252, 1, "s_def_hash_version"),
    (253, 1, "s_jnl_backup_type"), (254, 2, "s_desc_size"),
    (256, 4, "s_default_mount_opts"), (260, 4, "s_first_meta_bg"), (264, 4, "s_mkfs_time"),
    (268, 68, "s_jnl_blocks"), (336, 12, "s_*_count_hi"), (348, 4, "s_*_extra_isize"),
    (352, 4, "s_flags"), (356, 16, "s_raid/mmp"), (372, 1, "s_log_groups_per_flex"),
    (373, 1, "s_checksum_type"), (374, 2, "s_reserved_pad"), (376, 8, "s_kbytes_written"),
    (384, 20, "s_snapshot_*"), (404, 4, "s_error_count"), (408, 52, "s_first_error_*"),
    (460, 52, "s_last_error_*"), (512, 64, "s_mount_opts"), (576, 12, "s_*_quota_inum"),
    (588, 8, "s_overhead/backup_bgs"), (596, 20, "s_encrypt_*"), (616, 4, "s_lpf_ino"),
    (620, 4, "s_prj_quota_inum"), (624, 4, "s_checksum_seed"), (628, 1, "s_wtime_hi"),
    (629, 1, "s_mtime_hi"), (630, 1, "s_mkfs_time_hi"), (631, 1, "s_lastcheck_hi"),
    (632, 4, "s_*_error_*_hi"), (636, 4, "s_encoding*"), (640, 4, "s_orphan_file_inum"),
    (644, 376, "s_reserved"), (1020, 4, "s_checksum")]
EXT4_INODE = [
    (0, 2, "i_mode"), (2, 2, "i_uid"), (4, 4, "i_size"), (8, 4, "i_atime"),
    (12, 4, "i_ctime"), (16, 4, "i_mtime"), (20, 4, "i_dtime"), (24, 2, "i_gid"),
    (26, 2, "i_links_count"), (28, 4, "i_blocks"), (32, 4, "i_flags"),
    (36, 4, "i_version"), (40, 60, "i_block (extents)"), (100, 4, "i_generation"),
    (104, 4, "i_file_acl"), (108, 4, "i_size_high"), (112, 4, "i_obso_faddr"),
    (116, 8, "i_*_high"), (124, 2, "i_checksum_lo"), (126, 2, "i_reserved"),
    (128, 2, "i_extra_isize"), (130, 2, "i_checksum_hi"), (132, 4, "i_ctime_extra"),
    (136, 4, "i_mtime_extra"), (140, 4, "i_atime_extra"), (144, 4, "i_crtime"),
    (148, 4, "i_crtime_extra"), (152, 4, "i_version_hi"), (156, 4, "i_projid"),
    (160, 96, "in-inode xattrs")]
EXT4_GROUP_DESC = [
    (0, 4, "bg_block_bitmap"), (4, 4, "bg_inode_bitmap"), (8, 4, "bg_inode_table"),
    (12, 2, "bg_free_blocks_count"), (14, 2, "bg_free_inodes_count"),
    (16, 2, "bg_used_dirs_count"), (18, 2, "bg_flags"), (20, 4, "bg_exclude_bitmap"),
    (24, 4, "bg_*_bitmap_csum"), (28, 2, "bg_itable_unused"), (30, 2, "bg_checksum"),
    (32, 32, "bg_*_hi")]
JOURNAL_SUPER = [(0, 12, "header (magic, type, sequence)"), (12, 4, "s_blocksize"),
                 (16, 4, "s_maxlen"), (20, 4, "s_first"), (24, 4, "s_sequence"),
                 (28, 4, "s_start"), (32, 4, "s_errno"), (36, 12, "s_feature_*"),
                 (48, 16, "s_uuid"), (64, 4, "s_nr_users"), (68, 184, "s_*"),
                 (252, 4, "s_checksum"), (256, 768, "s_users")]
FAT_BOOT = [(0, 3, "jump"), (3, 8, "OEM name"), (11, 2, "bytes per sector"),
            (13, 1, "sectors per cluster"), (14, 2, "reserved sectors"),
            (16, 1, "number of FATs"), (17, 2, "root entries"), (19, 2, "total sectors 16"),
            (21, 1, "media"), (22, 2, "FAT size 16"), (24, 4, "geometry"),
            (28, 4, "hidden sectors"), (32, 4, "total sectors 32"), (36, 4, "FAT size 32"),
            (40, 4, "flags, version"), (44, 4, "root cluster"), (48, 2, "FSInfo sector"),
            (50, 2, "backup boot sector"), (52, 12, "reserved"), (64, 3, "drive, boot sig"),
            (67, 4, "volume id"), (71, 11, "volume label"), (82, 8, "FS type"),
            (90, 420, "boot code"), (510, 2, "signature")]
FAT_BOOT16 = [*FAT_BOOT[:11], (36, 3, "drive, boot sig"), (39, 4, "volume id"),
              (43, 11, "volume label"), (54, 8, "FS type"), (62, 448, "boot code"),
              (510, 2, "signature")]
FAT_FSINFO = [(0, 4, "lead signature"), (4, 480, "reserved"), (484, 4, "signature"),
              (488, 4, "free cluster count"), (492, 4, "next free cluster"),
              (496, 16, "reserved, trail signature")]
FAT_DIRENT = [(0, 11, "name"), (11, 1, "attributes"), (12, 1, "NT reserved"),
              (13, 1, "creation time (10 ms)"), (14, 2, "creation time"),
              (16, 2, "creation date"), (18, 2, "access date"), (20, 2, "cluster high"),
              (22, 2, "modification time"), (24, 2, "modification date"),
              (26, 2, "cluster low"), (28, 4, "size")]
QCOW2_HEADER = [(0, 4, "magic"), (4, 4, "version"), (8, 8, "backing file offset"),
                (16, 4, "backing file size"), (20, 4, "cluster bits"), (24, 8, "size"),
                (32, 4, "crypt method"), (36, 4, "L1 size"), (40, 8, "L1 table offset"),
                (48, 8, "refcount table offset"), (56, 4, "refcount table clusters"),
                (60, 4, "snapshots"), (64, 8, "snapshots offset"),
                (72, 32, "features, refcount order, header length"),
                (104, 4000, "header extensions")]


def field_names(table: list[tuple[int, int, str]], start: int, end: int) -> list[str]:
    """The names of the fields of ``table`` that bytes [start, end) touch."""
    names = [name for off, size, name in table if off < end and start < off + size]
    return names or [f"bytes {start}-{end - 1}"]


@dataclass(frozen=True)
class Region:
    """A structure of the image: bytes [start, end), a name, and a function that splits
    a range of its bytes into named parts (records, fields)."""

    start: int
    end: int
    name: str
    part: Callable[[int, int], list[tuple[str, list[str], int]]] | None = None

    def describe(self, start: int, end: int) -> list[tuple[str, list[str], int]]:
        """(where, field names, byte count) for the bytes [start, end) of this region."""
        if self.part is None:
            return [(self.name, [], end - start)]
        return [(f"{self.name}: {sub}" if sub else self.name, fields, count)
                for sub, fields, count in self.part(start - self.start, end - self.start)]


def table_part(table: list[tuple[int, int, str]]):
    return lambda lo, hi: [("", field_names(table, lo, hi), hi - lo)]


def records_part(size: int, label: Callable[[int], str], table: list[tuple[int, int, str]]):
    """Parts for an array of ``size``-byte records (inodes, entries, descriptors)."""
    def part(lo: int, hi: int) -> list[tuple[str, list[str], int]]:
        out = []
        for index in range(lo // size, (hi - 1) // size + 1):
            base = index * size
            a, b = max(lo, base) - base, min(hi, base + size) - base
            out.append((label(index), field_names(table, a, b), b - a))
        return out
    return part


def blocks_part(block: int, label: Callable[[int], str]):
    def part(lo: int, hi: int) -> list[tuple[str, list[str], int]]:
        return [(label(b), [], min(hi, (b + 1) * block) - max(lo, b * block))
                for b in range(lo // block, (hi - 1) // block + 1)]
    return part


# ------------------------------------------------------------------ layouts


def u16(data, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def u32(data, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def u64(data, off: int) -> int:
    return struct.unpack_from("<Q", data, off)[0]


def table_regions(data) -> tuple[list[Region], list[tuple[int, int, str]]]:
    """The partition table's structures and the partitions: (offset, size, label)."""
    if len(data) < SECTOR or data[510:512] != b"\x55\xaa":
        return [], []
    regions = [Region(0, SECTOR, "MBR", table_part(MBR_FIELDS))]
    entries = [data[446 + 16 * i:462 + 16 * i] for i in range(4)]
    if entries[0][4] == 0xEE and data[SECTOR:SECTOR + 8] == b"EFI PART":
        return gpt_regions(data, regions)
    parts = []
    for i, entry in enumerate(entries):
        kind, start, count = entry[4], u32(entry, 8), u32(entry, 12)
        if kind and count:
            parts.append((start * SECTOR, count * SECTOR, f"partition {i + 1} (MBR type "
                                                          f"{kind:02x})"))
    return regions, parts


def gpt_regions(data, regions: list[Region]) -> tuple[list[Region], list]:
    parts = []
    header = SECTOR
    backup_lba = u64(data, header + 32)
    for which, lba in (("primary", 1), ("backup", backup_lba)):
        off = lba * SECTOR
        if off + SECTOR > len(data) or data[off:off + 8] != b"EFI PART":
            continue
        regions.append(Region(off, off + SECTOR, f"GPT {which} header (LBA {lba})",
                              table_part(GPT_HEADER)))
        entries, count, size = u64(data, off + 72), u32(data, off + 80), u32(data, off + 84)
        start = entries * SECTOR
        regions.append(Region(start, start + count * size,
                              f"GPT {which} entries (LBA {entries})",
                              records_part(size, lambda i: f"entry {i + 1}", GPT_ENTRY)))
        if which == "primary":
            for i in range(count):
                entry = data[start + i * size:start + (i + 1) * size]
                if entry[:16] == b"\0" * 16:
                    continue
                first, last = u64(entry, 32), u64(entry, 40)
                name = entry[56:128].decode("utf-16-le", "replace").rstrip("\0")
                parts.append((first * SECTOR, (last - first + 1) * SECTOR,
                              f"partition {i + 1}" + (f" ({name})" if name else "")))
    return regions, parts


def ext4_regions(data, base: int, label: str) -> list[Region]:
    """The structures of an ext4 filesystem starting at ``base``."""
    sb = base + 1024
    bsize = 1024 << u32(data, sb + 24)
    blocks = u32(data, sb + 4) | (u32(data, sb + 336) << 32)
    per_group, inodes_per_group = u32(data, sb + 32), u32(data, sb + 40)
    first_data, inode_size = u32(data, sb + 20), u16(data, sb + 88)
    incompat, ro_compat = u32(data, sb + 96), u32(data, sb + 100)
    desc_size = u16(data, sb + 254) if incompat & 0x80 else 32
    groups = (blocks - first_data + per_group - 1) // per_group
    gdt_blocks = (groups * desc_size + bsize - 1) // bsize
    reserved_gdt = u16(data, sb + 206)

    def at(block: int) -> int:
        return base + block * bsize

    def has_super(group: int) -> bool:
        if not ro_compat & 1 or group <= 1:  # not sparse_super, or groups 0 and 1
            return True
        for prime in (3, 5, 7):
            n = group
            while n % prime == 0:
                n //= prime
            if n == 1:
                return True
        return False

    # Blocks no structure below claims: file data, directories, extent tree blocks.
    regions = [Region(at(0), at(blocks), f"{label}: data",
                      blocks_part(bsize, lambda b: f"block {b}"))]
    gdt = at(first_data + 1)
    for group in range(groups):
        if not has_super(group):
            continue
        first = first_data + group * per_group
        start = base + 1024 if group == 0 else at(first)
        copy = "primary" if group == 0 else f"backup in group {group}"
        regions.append(Region(start, start + 1024, f"{label}: superblock ({copy})",
                              table_part(EXT4_SUPER)))
        gstart = at(first + 1)
        regions.append(Region(gstart, gstart + gdt_blocks * bsize,
                              f"{label}: group descriptors ({copy})",
                              records_part(desc_size, lambda i: f"group {i}",
                                           EXT4_GROUP_DESC)))
        if reserved_gdt:
            rstart = gstart + gdt_blocks * bsize
            regions.append(Region(rstart, rstart + reserved_gdt * bsize,
                                  f"{label}: reserved GDT blocks ({copy})"))
    for group in range(groups):
        desc = gdt + group * desc_size
        hi = desc_size >= 64

        def loc(off: int, desc: int = desc, hi: bool = hi) -> int:
            return u32(data, desc + off) | ((u32(data, desc + 32 + off) << 32) if hi else 0)

        block_bitmap, inode_bitmap, table = loc(0), loc(4), loc(8)
        regions.append(Region(at(block_bitmap), at(block_bitmap) + bsize,
                              f"{label}: block bitmap of group {group}"))
        regions.append(Region(at(inode_bitmap), at(inode_bitmap) + bsize,
                              f"{label}: inode bitmap of group {group}"))
        first_ino = group * inodes_per_group + 1
        regions.append(Region(at(table), at(table) + inodes_per_group * inode_size,
                              f"{label}: inode table of group {group}",
                              records_part(inode_size,
                                           lambda i, f=first_ino: f"inode {f + i}",
                                           EXT4_INODE)))
    journal = u32(data, sb + 224)
    if u32(data, sb + 92) & 4 and journal:  # has_journal, internal
        for first, count, lblock in ext4_extents(data, base, bsize, gdt, desc_size,
                                                  inodes_per_group, inode_size, journal):
            start = at(first)
            if lblock == 0:
                regions.append(Region(start, start + bsize, f"{label}: journal superblock",
                                      table_part(JOURNAL_SUPER)))
                start += bsize
                first += 1
                count -= 1
                lblock = 1
            regions.append(Region(start, start + count * bsize, f"{label}: journal",
                                  blocks_part(bsize, lambda b, s=lblock: f"block {s + b}")))
    return regions


def inode_offset(data, base: int, bsize: int, gdt: int, desc_size: int,
                 inodes_per_group: int, inode_size: int, ino: int) -> int:
    group, index = divmod(ino - 1, inodes_per_group)
    desc = gdt + group * desc_size
    table = u32(data, desc + 8) | ((u32(data, desc + 40) << 32) if desc_size >= 64 else 0)
    return base + table * bsize + index * inode_size


def ext4_extents(data, base, bsize, gdt, desc_size, inodes_per_group, inode_size,
                 ino) -> Iterator[tuple[int, int, int]]:
    """(first physical block, count, first logical block) of an extent-mapped inode."""
    node = inode_offset(data, base, bsize, gdt, desc_size, inodes_per_group, inode_size,
                        ino) + 40
    yield from _extent_node(data, base, bsize, node, 4)


def _extent_node(data, base, bsize, node, depth_left) -> Iterator[tuple[int, int, int]]:
    magic, entries, _max, depth = struct.unpack_from("<HHHH", data, node)
    if magic != 0xF30A or depth_left < 0:
        return
    for i in range(entries):
        entry = node + 12 + 12 * i
        if depth == 0:
            lblock, length, hi, lo = struct.unpack_from("<IHHI", data, entry)
            yield (hi << 32) | lo, length & 0x7FFF, lblock
        else:
            _lblock, lo, hi = struct.unpack_from("<IIH", data, entry)
            yield from _extent_node(data, base, bsize, base + ((hi << 32) | lo) * bsize,
                                    depth_left - 1)


def fat_regions(data, base: int, label: str) -> list[Region]:
    """The structures of a FAT filesystem starting at ``base``; directories are walked
    so that every cluster is named by the directory or file that owns it."""
    bps, spc, reserved, nfats = u16(data, base + 11), data[base + 13], \
        u16(data, base + 14), data[base + 16]
    root_entries = u16(data, base + 17)
    fat_size = u16(data, base + 22) or u32(data, base + 36)
    fat32 = u16(data, base + 22) == 0
    regions = [Region(base, base + bps, f"{label}: boot sector",
                      table_part(FAT_BOOT if fat32 else FAT_BOOT16))]
    if fat32:
        fsinfo, backup = u16(data, base + 48), u16(data, base + 50)
        regions.append(Region(base + fsinfo * bps, base + (fsinfo + 1) * bps,
                              f"{label}: FSInfo sector", table_part(FAT_FSINFO)))
        if backup:
            regions.append(Region(base + backup * bps, base + (backup + 1) * bps,
                                  f"{label}: backup boot sector",
                                  table_part(FAT_BOOT)))
    regions.append(Region(base, base + reserved * bps, f"{label}: reserved sectors"))
    width = 4 if fat32 else 2
    fat_start = base + reserved * bps
    for k in range(nfats):
        start = fat_start + k * fat_size * bps
        regions.append(Region(start, start + fat_size * bps, f"{label}: FAT #{k + 1}",
                              blocks_part(bps, lambda n, per=bps // width:
                                          f"sector {n} (clusters {n * per}-"
                                          f"{(n + 1) * per - 1})")))
    root_dir = fat_start + nfats * fat_size * bps
    data_start = root_dir + (0 if fat32 else root_entries * 32)
    cluster_bytes = spc * bps

    def cluster_at(n: int) -> int:
        return data_start + (n - 2) * cluster_bytes

    total = u16(data, base + 19) or u32(data, base + 32)
    regions.append(Region(data_start, base + total * bps, f"{label}: data area",
                          blocks_part(cluster_bytes, lambda c: f"cluster {c + 2}")))

    def chain(first: int) -> list[int]:
        out, n = [], first
        end = 0x0FFFFFF8 if fat32 else 0xFFF8
        while 2 <= n < end and len(out) < 1 << 20 and n not in out[-1:]:
            out.append(n)
            off = fat_start + n * width
            n = (u32(data, off) & 0x0FFFFFFF) if fat32 else u16(data, off)
        return out

    def walk(path: str, spans: list[tuple[int, int]], depth: int) -> None:
        for start, end in spans:
            regions.append(Region(start, end, f"{label}: directory {path or '/'}",
                                  records_part(32, lambda i: f"entry {i}", FAT_DIRENT)))
        if depth > 16:
            return
        for start, end in spans:
            for off in range(start, end, 32):
                entry = data[off:off + 32]
                if entry[0] == 0:
                    return
                if entry[0] == 0xE5 or entry[11] & 0x0F == 0x0F or entry[11] & 0x08:
                    continue
                name = entry[:8].decode("latin-1").rstrip()
                ext = entry[8:11].decode("latin-1").rstrip()
                if name in (".", ".."):
                    continue
                full = f"{path}/{name}{'.' + ext if ext else ''}"
                first = (u16(entry, 20) << 16 | u16(entry, 26)) if fat32 else u16(entry, 26)
                clusters = [(cluster_at(c), cluster_at(c) + cluster_bytes)
                            for c in chain(first)]
                if entry[11] & 0x10:
                    walk(full, clusters, depth + 1)
                else:
                    for s, e in clusters:
                        regions.append(Region(s, e, f"{label}: file {full} (data)"))

    if fat32:
        walk("", [(cluster_at(c), cluster_at(c) + cluster_bytes)
                  for c in chain(u32(data, base + 44))], 0)
    else:
        walk("", [(root_dir, data_start)], 0)
    return regions


def filesystem_regions(data, base: int, size: int, label: str) -> list[Region]:
    if base + 2048 <= len(data) and u16(data, base + 1024 + 56) == 0xEF53:
        return ext4_regions(data, base, f"{label} ext4")
    if base + SECTOR <= len(data) and data[base + 510:base + 512] == b"\x55\xaa" and (
            data[base + 82:base + 87] == b"FAT32" or data[base + 54:base + 57] == b"FAT"):
        return fat_regions(data, base, f"{label} FAT")
    return []


def image_regions(data) -> list[Region]:
    """Every structure found in a raw image, innermost last (so they win)."""
    regions, parts = table_regions(data)
    for start, size, label in parts:
        regions.append(Region(start, start + size, label))
    for start, size, label in parts:
        try:
            regions += filesystem_regions(data, start, size, label)
        except (struct.error, IndexError, ValueError):
            regions.append(Region(start, start + size, f"{label}: (layout unreadable)"))
    if not parts:  # a bare filesystem
        regions += filesystem_regions(data, 0, len(data), "filesystem")
    return regions


# ------------------------------------------------------------------ differences


def diff_ranges(a, b) -> Iterator[tuple[int, int]]:
    """[start, end) ranges where ``a`` and ``b`` differ (over their common length)."""
    n = min(len(a), len(b))
    run_start = None
    for chunk in range(0, n, CHUNK):
        end = min(chunk + CHUNK, n)
        if a[chunk:end] == b[chunk:end]:
            if run_start is not None:
                yield run_start, chunk
                run_start = None
            continue
        for block in range(chunk, end, BLOCK):
            bend = min(block + BLOCK, end)
            if a[block:bend] == b[block:bend]:
                if run_start is not None:
                    yield run_start, block
                    run_start = None
                continue
            x, y = a[block:bend], b[block:bend]
            for i in range(bend - block):
                if x[i] != y[i]:
                    if run_start is None:
                        run_start = block + i
                elif run_start is not None:
                    yield run_start, block + i
                    run_start = None
    if run_start is not None:
        yield run_start, n


@dataclass
class Finding:
    """Differing bytes in one structure: where, how many, which fields."""

    where: str
    first: int  # offset of the first differing byte
    count: int
    fields: list[str]


class Map:
    """The structures of an image as elementary segments, each with the innermost
    (smallest) structure that holds it."""

    def __init__(self, regions: list[Region]) -> None:
        points = sorted({p for r in regions for p in (r.start, r.end)})
        starting: dict[int, list[tuple[int, Region]]] = {}
        for order, r in enumerate(regions):
            if r.end > r.start:
                starting.setdefault(r.start, []).append((order, r))
        active: list[tuple[int, Region]] = []
        self.bounds: list[int] = []
        self.owner: list[Region | None] = []
        for point in points:
            active = [(o, r) for o, r in active if r.end > point] + starting.get(point, [])
            # The smallest; of equal ones the later (regions come outermost first).
            best = min(active, key=lambda a: (a[1].end - a[1].start, -a[0]), default=None)
            self.bounds.append(point)
            self.owner.append(best[1] if best else None)

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, Region | None]]:
        """[s, e) pieces of [start, end) with the structure holding each."""
        i = bisect.bisect_right(self.bounds, start) - 1
        pos = start
        while pos < end:
            nxt = self.bounds[i + 1] if i + 1 < len(self.bounds) else end
            stop = min(end, nxt) if nxt > pos else end
            yield pos, stop, self.owner[i] if i >= 0 else None
            pos = stop
            i += 1


def locate(regions: list[Region], ranges: list[tuple[int, int]]) -> list[Finding]:
    """Each differing range described by the innermost structures that hold it."""
    layout = Map(regions)
    found: dict[str, Finding] = {}
    for start, end in ranges:
        for pos, stop, holder in layout.segments(start, end):
            parts = holder.describe(pos, stop) if holder else [
                ("outside any known structure", [], stop - pos)]
            for where, fields, count in parts:
                finding = found.setdefault(where, Finding(where, pos, 0, []))
                finding.count += count
                for name in fields:
                    if name not in finding.fields:
                        finding.fields.append(name)
    return merge_runs(sorted(found.values(), key=lambda f: f.first))


RUN = re.compile(r"(.*: (?:data area|journal): )(cluster|block) (\d+)$")


def merge_runs(findings: list[Finding]) -> list[Finding]:
    """Consecutive FAT clusters and journal blocks as one finding ("clusters 5-9")."""
    out: list[Finding] = []
    last: tuple[str, str, int, int] | None = None  # prefix, unit, first, last number
    for finding in findings:
        match = RUN.fullmatch(finding.where)
        if match and last and out and match.group(1) == last[0] and \
                int(match.group(3)) == last[3] + 1:
            last = (last[0], last[1], last[2], int(match.group(3)))
            out[-1].count += finding.count
            out[-1].where = f"{last[0]}{last[1]}s {last[2]}-{last[3]}"
            continue
        out.append(finding)
        last = ((match.group(1), match.group(2), int(match.group(3)), int(match.group(3)))
                if match else None)
    return out


def differences(a: Path, b: Path) -> tuple[list[Finding], str]:
    """What differs between images ``a`` and ``b``: the findings and a summary line."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size == 0 or os.fstat(fb.fileno()).st_size == 0:
            same = os.fstat(fa.fileno()).st_size == os.fstat(fb.fileno()).st_size
            return [], "" if same else f"{a} and {b} differ in size"
        with mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as ma, \
                mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as mb:
            ranges = list(diff_ranges(ma, mb))
            notes = []
            if len(ma) != len(mb):
                notes.append(f"sizes differ: {len(ma)} and {len(mb)} bytes")
            if not ranges:
                return [], "; ".join(notes)
            if ma[:4] == b"QFI\xfb":
                regions = [Region(0, 4104, "qcow2 header", table_part(QCOW2_HEADER))]
            else:
                regions = image_regions(ma)
            findings = locate(regions, ranges)
            total = sum(e - s for s, e in ranges)
            notes.insert(0, f"{total} bytes differ in {len(ranges)} ranges")
            return findings, "; ".join(notes)


def name_ext4_objects(image: Path, findings: list[Finding]) -> None:
    """Add file names to ext4 inodes and blocks (debugfs icheck, ncheck), when
    debugfs is installed."""
    debugfs = shutil.which("debugfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not debugfs:
        return
    wanted: dict[str, list[tuple[Finding, str, str]]] = {}
    for finding in findings:
        label, sep, what = finding.where.partition(" ext4: ")
        words = what.split()
        if sep and len(words) >= 2 and words[-2] in ("inode", "block") and (
                "inode table" in what or what.startswith("data:")):
            wanted.setdefault(label, []).append((finding, words[-2], words[-1]))
    for label, items in wanted.items():
        offset = _partition_offset(image, label)
        if offset is None:
            continue
        target = f"{image}?offset={offset}"
        blocks = [n for _f, kind, n in items if kind == "block"]
        owner: dict[str, str] = {}
        if blocks:
            out = _debugfs(debugfs, target, "icheck " + " ".join(blocks))
            for line in out.splitlines()[1:]:
                words = line.split()
                if len(words) == 2 and words[1].isdigit():
                    owner[words[0]] = words[1]
        inodes = {n for _f, kind, n in items if kind == "inode"} | set(owner.values())
        names: dict[str, str] = {}
        if inodes:
            out = _debugfs(debugfs, target, "ncheck " + " ".join(sorted(inodes)))
            for line in out.splitlines()[1:]:
                ino, _, name = line.partition("\t")
                names.setdefault(ino.strip(), "/" + name.lstrip("/"))
        for finding, kind, number in items:
            ino = number if kind == "inode" else owner.get(number)
            if ino is None:
                continue
            name = names.get(ino, "")
            finding.where += (f" ({name})" if kind == "inode" and name else
                              f" (inode {ino}{', ' + name if name else ''})"
                              if kind == "block" else "")


def _debugfs(debugfs: str, target: str, request: str) -> str:
    return subprocess.run([debugfs, "-R", request, target], capture_output=True,
                          text=True).stdout


def _partition_offset(image: Path, label: str) -> int | None:
    with open(image, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        _regions, parts = table_regions(m)
    for start, _size, name in parts:
        if name == label:
            return start
    return 0 if label == "filesystem" else None


def explain(a: Path, b: Path, limit: int = 40) -> str:
    """A readable account of where ``a`` and ``b`` differ ("" when they are the same).

    qcow2 images are compared as files first; when they differ, their guest data are
    converted to raw (qemu-img) and compared structure by structure too."""
    findings, summary = differences(a, b)
    if not findings and not summary:
        return ""
    lines = [f"{a} and {b}: {summary}"]
    name_ext4_objects(a, findings)
    for finding in findings[:limit]:
        fields = f": {', '.join(finding.fields)}" if finding.fields else ""
        lines.append(f"  {finding.where} (at byte {finding.first}, {finding.count} "
                     f"bytes){fields}")
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more places")
    if _is_qcow2(a) and _is_qcow2(b):
        lines.append(qcow2_contents(a, b, limit))
    return "\n".join(lines)


def _is_qcow2(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"QFI\xfb"


def qcow2_contents(a: Path, b: Path, limit: int) -> str:
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        return "  (qemu-img not installed: the guest data of the qcow2 images not compared)"
    with tempfile.TemporaryDirectory(prefix="imagediff-") as tmp:
        raws = []
        for i, path in enumerate((a, b)):
            raw = Path(tmp) / f"{i}.raw"
            subprocess.run([qemu_img, "convert", "-O", "raw", str(path), str(raw)],
                           check=True)
            raws.append(raw)
        text = explain(*raws, limit=limit)
        return ("the guest data:\n" + text.replace(str(raws[0]), str(a))
                .replace(str(raws[1]), str(b))) if text else "  the guest data are the same"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hshelper.imagediff",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--limit", type=int, default=40, help="places to list at most")
    args = parser.parse_args(argv)
    try:
        text = explain(args.a, args.b, args.limit)
    except (OSError, ValueError, subprocess.CalledProcessError) as err:
        print(f"imagediff: {err}", file=sys.stderr)
        return 2
    if not text:
        print(f"{args.a} and {args.b} are identical")
        return 0
    print(text)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Reproducible images: identifiers derived from a seed, times from SOURCE_DATE_EPOCH.

With ``SOURCE_DATE_EPOCH`` in the environment, or a seed (the recipes' ``--seed``,
``[mkimage] seed``), an image recipe makes the same bytes from the same inputs. Every
identifier not given explicitly is derived here, and in ``recipes/mkimage.sh`` (its
``derive_ids``), the same way: the sha256 of a few lines naming the seed, the sha256 of
ROOT (a tarball; empty for a directory), the partition table type and the identifier's
role, so that two images from different tarballs or tables get different identifiers
even with the same seed. Every time the build makes is the epoch.

Pure functions; the plugin ``mkimage`` and the recipe do the writing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# FAT stores no date before 1980: the default epoch when only a seed is given, and the
# earliest date written on a FAT filesystem.
FAT_EPOCH = 315532800
VERSION = "hshelper-mkimage 1"
ROLES = ("disk", "esp-part", "root-part", "root-fs", "esp-fs", "hash-seed")


class BadSetting(ValueError):
    """A seed or SOURCE_DATE_EPOCH that cannot be used (a usage error)."""


@dataclass(frozen=True)
class Settings:
    """How a reproducible image is made: the seed its identifiers come from, the epoch
    its times are, and where the seed came from (for the report)."""

    seed: str
    epoch: int
    seed_from: str  # "--seed", "config" or "SOURCE_DATE_EPOCH"


def settings(seed: str | None, env: Mapping[str, str],
             seed_from: str = "--seed") -> Settings | None:
    """The settings a run asks for, or None for an ordinary image (fresh random ids).

    ``seed``: the seed given (option or config), else None. Raises :class:`BadSetting`.
    """
    text = env.get("SOURCE_DATE_EPOCH", "")
    if text and not text.isdigit():
        raise BadSetting(f"SOURCE_DATE_EPOCH must be seconds since 1970, not {text!r}")
    if seed is not None and "\n" in seed:
        raise BadSetting("--seed: one line of text")
    if not seed and not text:
        return None
    if seed:
        return Settings(seed, int(text) if text else FAT_EPOCH, seed_from)
    return Settings(text, int(text), "SOURCE_DATE_EPOCH")


def derive(seed: str, root_sha256: str, table: str, role: str) -> str:
    """64 hex digits for ``role``, as mkimage.sh's derive_ids computes them."""
    text = (f"{VERSION}\nseed {seed}\nroot {root_sha256}\ntable {table}\n"
            f"role {role}\n")
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def as_uuid(digest: str) -> str:
    """A UUID of version 4's form (RFC 4122 variant) from the first 32 hex digits."""
    h = digest[:32]
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True)
class Identifiers:
    """Every identifier of an image (GPT: disk and ESP GUIDs; MBR: the disk id)."""

    disk: str  # GPT disk GUID, or the MBR disk id (8 hex digits)
    esp_part: str  # the ESP's partition GUID
    root_partuuid: str  # GPT: a UUID; MBR: DISKID-01
    root_uuid: str  # the root filesystem's UUID
    esp_id: str  # the FAT volume id, 8 upper-case hex digits
    hash_seed: str  # ext4's directory hash seed


def identifiers(seed: str, root_sha256: str, table: str) -> Identifiers:
    """The derived identifiers of an image with ``table`` ("gpt" or "mbr")."""
    d = {role: derive(seed, root_sha256, table, role) for role in ROLES}
    if table == "gpt":
        disk, partuuid = as_uuid(d["disk"]), as_uuid(d["root-part"])
    else:
        disk = d["disk"][:8]
        partuuid = f"{disk}-01"
    return Identifiers(disk, as_uuid(d["esp-part"]), partuuid, as_uuid(d["root-fs"]),
                       d["esp-fs"][:8].upper(), as_uuid(d["hash-seed"]))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fat_datetime(epoch: int) -> tuple[int, int]:
    """(time, date) words of a FAT directory entry for ``epoch`` in UTC (from 1980)."""
    t = time.gmtime(max(epoch, FAT_EPOCH))
    return (t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2,
            (t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday)


def fat_label_stamp(boot_sector: bytes, epoch: int) -> tuple[int, bytes]:
    """Where (bytes into the filesystem) and what to write so that the volume label
    entry mkfs.fat --invariant made (the FAT32 root directory's first entry) carries
    ``epoch``: bytes 13-25 of the entry, creation, access and modification times."""
    bps = int.from_bytes(boot_sector[11:13], "little")
    spc = boot_sector[13]
    reserved = int.from_bytes(boot_sector[14:16], "little")
    fats = boot_sector[16]
    fat_size = int.from_bytes(boot_sector[36:40], "little")
    root_cluster = int.from_bytes(boot_sector[44:48], "little")
    entry = (reserved + fats * fat_size + (root_cluster - 2) * spc) * bps
    tw, dw = fat_datetime(epoch)
    t, d = tw.to_bytes(2, "little"), dw.to_bytes(2, "little")
    return entry + 13, b"\0" + t + d + d + b"\0\0" + t + d

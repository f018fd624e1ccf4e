"""Partitioning and filesystem tools for the image: whichever of them are installed.

sfdisk, sgdisk, parted, wipefs, blkid, partx, losetup's friends, mkfs for ext4, vfat,
xfs and btrfs, their fsck, tar and the like, plus the config files some of them read
(/etc/mke2fs.conf), and the kernel modules of the filesystems whose mkfs is installed
(xfs, btrfs: big modules nobody needs without their tools). Nothing here is required: a
recipe that needs a missing tool gets exit 127 with the tool's name. The ESSENTIAL tools
are in whenever installed; the others obey ``image.program_budget_kb`` (sgdisk's
libstdc++ alone is 3 MB). No config keys.
"""

from __future__ import annotations

from hshelper import elf
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, File, Program

TOOLS = (
    "sfdisk", "sgdisk", "parted", "partprobe", "partx", "wipefs", "blkid", "fdisk",
    "mkfs", "mke2fs", "mkfs.ext2", "mkfs.ext3", "mkfs.ext4", "e2fsck", "fsck", "fsck.ext4",
    "tune2fs", "resize2fs", "debugfs", "e2label", "dumpe2fs",
    "mkfs.fat", "mkfs.vfat", "fsck.fat", "fsck.vfat", "fatlabel", "mtools", "mcopy", "mmd",
    "mkfs.xfs", "xfs_repair", "xfs_admin", "mkfs.btrfs", "btrfs", "btrfstune",
    "mkswap", "swaplabel", "findmnt", "lsblk", "tar", "cpio", "zstd", "xz", "bzip2",
    "rsync", "chroot", "unshare",
)
# The tools image recipes cannot do without: in the image whenever installed, whatever
# they weigh (the others obey image.program_budget_kb).
ESSENTIAL = frozenset({
    "sfdisk", "wipefs", "blkid", "partx", "mkfs", "mke2fs", "mkfs.ext4", "e2fsck", "fsck",
    "fsck.ext4", "mkfs.fat", "mkfs.vfat", "mkfs.xfs", "mkfs.btrfs", "tar",
})
CONFIG_FILES = ("/etc/mke2fs.conf", "/etc/mtools.conf")
# Filesystem module -> the mkfs whose presence makes it worth its size.
FS_MODULES = {"xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs"}


# dosfstools converts file names through iconv's CP850 (its default codepage) and warns
# on every mkfs.vfat without it; glibc finds it through the gconv cache. Debian keeps it
# in the multiarch directory of the architecture, others in lib64 or lib.
GCONV_DIRS = ("/usr/lib64/gconv", "/usr/lib/gconv")
GCONV_FILES = ("gconv-modules", "gconv-modules.cache", "IBM850.so")


def gconv_files(sysroot) -> tuple[str, ...]:
    """CP850 for mkfs.vfat, from the first gconv directory the build root has."""
    if not (sysroot.which("mkfs.fat") or sysroot.which("mkfs.vfat")):
        return ()
    multiarch = [f"{d}/gconv" for d in elf.multiarch_dirs(sysroot.root)
                 if d.startswith("/usr/")]
    for directory in (*multiarch, *GCONV_DIRS):
        if sysroot.exists(f"{directory}/IBM850.so"):
            return tuple(f"{directory}/{name}" for name in GCONV_FILES
                         if sysroot.exists(f"{directory}/{name}"))
    return ()


@hookimpl
def hshelper_image_contents(sysroot):
    wanted = [*CONFIG_FILES, *gconv_files(sysroot)]
    files = tuple(File(path, source=path) for path in wanted if sysroot.exists(path))
    modules = tuple(f"{m}?" for m, tool in FS_MODULES.items() if sysroot.which(tool))
    programs = tuple(Program(t, applet=False, essential=t in ESSENTIAL) for t in TOOLS)
    return Contents(programs=programs, files=files,
                    modules=modules)

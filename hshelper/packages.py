"""Which package provides a program, for the "install X" part of an error message.

A small table of the programs image scripts call, per distribution family (from the
build root's /etc/os-release); for anything else the message says how to find out.
"""

from __future__ import annotations

FAMILIES = {"debian": "debian", "ubuntu": "debian", "fedora": "fedora", "rhel": "fedora",
            "centos": "fedora", "altlinux": "altlinux", "suse": "suse", "opensuse": "suse"}

# program -> {family: package}; a family missing means the Debian name is the same there.
TOOLS: dict[str, dict[str, str]] = {
    "sfdisk": {"debian": "fdisk", "fedora": "util-linux", "altlinux": "util-linux"},
    "fdisk": {"debian": "fdisk", "fedora": "util-linux", "altlinux": "util-linux"},
    "sgdisk": {"debian": "gdisk", "fedora": "gdisk", "altlinux": "gdisk"},
    "parted": {"debian": "parted"}, "partprobe": {"debian": "parted"},
    "kpartx": {"debian": "kpartx", "fedora": "kpartx", "altlinux": "multipath-tools"},
    "mkfs.ext4": {"debian": "e2fsprogs"}, "mke2fs": {"debian": "e2fsprogs"},
    "debugfs": {"debian": "e2fsprogs"}, "e2fsck": {"debian": "e2fsprogs"},
    "mkfs.vfat": {"debian": "dosfstools"}, "mkfs.fat": {"debian": "dosfstools"},
    "mkfs.xfs": {"debian": "xfsprogs"}, "mkfs.btrfs": {"debian": "btrfs-progs"},
    "mksquashfs": {"debian": "squashfs-tools"}, "unsquashfs": {"debian": "squashfs-tools"},
    "xorriso": {"debian": "xorriso"}, "genisoimage": {"debian": "genisoimage"},
    "cryptsetup": {"debian": "cryptsetup-bin", "fedora": "cryptsetup",
                   "altlinux": "cryptsetup"},
    "pvcreate": {"debian": "lvm2"}, "vgcreate": {"debian": "lvm2"}, "lvcreate": {"debian": "lvm2"},
    "lvm": {"debian": "lvm2"}, "dmsetup": {"debian": "dmsetup", "fedora": "device-mapper",
                                           "altlinux": "dmsetup"},
    "mdadm": {"debian": "mdadm"},
    "grub-install": {"debian": "grub2-common (and grub-pc-bin or grub-efi-amd64-bin)",
                     "fedora": "grub2-tools", "altlinux": "grub-common"},
    "debootstrap": {"debian": "debootstrap"}, "mmdebstrap": {"debian": "mmdebstrap"},
    "qemu-img": {"debian": "qemu-utils", "fedora": "qemu-img", "altlinux": "qemu-img"},
    "losetup": {"debian": "mount", "fedora": "util-linux", "altlinux": "util-linux"},
    "rsync": {"debian": "rsync"}, "zstd": {"debian": "zstd"}, "xz": {"debian": "xz-utils"},
    "mtools": {"debian": "mtools"}, "mcopy": {"debian": "mtools"},
    "extlinux": {"debian": "extlinux", "fedora": "syslinux-extlinux"},
    "python3": {"debian": "python3"}, "perl": {"debian": "perl"},
    # The image's base programs (a minimal root may lack them: mmdebstrap's apt variant).
    "mount": {"debian": "mount", "fedora": "util-linux-core", "altlinux": "util-linux"},
    "umount": {"debian": "mount", "fedora": "util-linux-core", "altlinux": "util-linux"},
    "tar": {"debian": "tar"}, "chroot": {"debian": "coreutils", "altlinux": "coreutils"},
    "cpio": {"debian": "cpio"}, "busybox": {"debian": "busybox"},
}
FIND_OUT = {"debian": "apt-file search", "fedora": "dnf provides",
            "altlinux": "apt-cache search", "suse": "zypper search --provides"}


def family(os_release: dict[str, str]) -> str | None:
    for distro_id in [os_release.get("ID", ""), *os_release.get("ID_LIKE", "").split()]:
        if distro_id in FAMILIES:
            return FAMILIES[distro_id]
    return None


def install_hint(program: str, os_release: dict[str, str]) -> str:
    """'install PACKAGE in the build root', or how to find the package."""
    fam = family(os_release)
    known = TOOLS.get(program)
    if known:
        package = known.get(fam or "debian", known.get("debian"))
        return f"install {package} in the build root"
    how = FIND_OUT.get(fam or "", "your package manager's search")
    return f"install the package that provides it in the build root ({how} {program})"

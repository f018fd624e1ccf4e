#!/bin/sh
# mkimage-mbr.sh: a bootable disk image with the classic MBR layout (BIOS, boards).
#
# One bootable root partition, extlinux installed from the root filesystem. A thin
# front for mkimage.sh --table mbr, which does the work.
set -eu

case ${1:-} in
-h | --help)
    cat <<'HELP'
usage: mkimage-mbr.sh [mkimage.sh OPTIONS] ROOT [OUTPUT]

A bootable disk image with an MBR (DOS) partition table, as root in the hshelper VM:

  helper-run --disk root.tar,ro,name=src --disk disk.img.part,size=1G,name=out \
      recipes/mkimage-mbr.sh /dev/disk/hshelper/src disk.img

Layout: one primary partition, marked bootable, holding the root filesystem (ext4 by
default, made without the 64bit feature, which syslinux cannot read). Bootloader:
/boot/extlinux/extlinux.conf (what U-Boot's distro boot reads on boards) and, when the
root filesystem has extlinux and syslinux-common, extlinux installed in the partition
and syslinux's MBR code in the first sector (legacy BIOS). The kernel finds the root
by PARTUUID (DISKID-01); /etc/fstab names it by UUID.

Every option of mkimage.sh applies (--fs, --kernel, --append, --console, --qcow2,
--sha256, --device, --bootloader extlinux|none, --seed); see mkimage.sh --help.

Reproducible images: set SOURCE_DATE_EPOCH (or give --seed SEED) and the same inputs
give the same image, byte for byte; without either every image gets fresh random
identifiers (mkimage.sh --help says what is derived and how).
HELP
    exit 0
    ;;
esac
exec sh "$(dirname "$0")/mkimage.sh" --table mbr "$@"

#!/bin/bash
# grub-bios.sh - a small legacy-BIOS disk with GRUB installed to its MBR.
#
#   grub-bios.sh IMAGE [SIZE]
#
# One bootable ext2 partition; grub-install --target=i386-pc writes boot.img to the MBR
# and core.img to the gap after it, and /boot/grub/grub.cfg says where we are.
set -euo pipefail

IMAGE=$1
SIZE=${2:-64M}

WORK=$(mktemp -d --tmpdir grubimg.XXXXXX)
LOOP=""

cleanup() {
    if mountpoint -q "$WORK/mnt"; then
        umount "$WORK/mnt"
    fi
    if [[ -n "$LOOP" ]]; then
        losetup -d "$LOOP"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo ">>> creating $IMAGE ($SIZE)"
rm -f "$IMAGE"
qemu-img create -q -f raw "$IMAGE" "$SIZE"
parted --script "$IMAGE" -- mklabel msdos mkpart primary ext2 1MiB -1s set 1 boot on

LOOP=$(losetup --find --show --partscan "$IMAGE")
echo ">>> $IMAGE on $LOOP"
mkfs.ext2 -q -L grubboot "${LOOP}p1"
mkdir "$WORK/mnt"
mount "${LOOP}p1" "$WORK/mnt"

echo ">>> installing GRUB"
grub-install --target=i386-pc --boot-directory="$WORK/mnt/boot" \
    --modules="part_msdos ext2" --no-floppy "$LOOP"

cat >"$WORK/mnt/boot/grub/grub.cfg" <<'GRUBCFG'
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
search --no-floppy --label grubboot --set=bootpart
echo "HSHELPER-MARKER grub root=$root label=grubboot found=$bootpart"
if [ -f /boot/grub/i386-pc/core.img ]; then
    echo "HSHELPER-MARKER grub core.img present"
fi
echo "HSHELPER-MARKER done"
halt
GRUBCFG

ls -l "$WORK/mnt/boot/grub"
sync
echo ">>> done"

#!/bin/bash
# devlinks.sh - the ways image scripts make the kernel see new partitions, and the
# /dev/disk/by-* links they use after mkfs (with and without udevadm settle).
#
#   devlinks.sh IMAGE
set -euo pipefail

IMAGE=$1
MNT=$(mktemp -d)
LOOP=

cleanup() {
    umount -R "$MNT/root" 2>/dev/null || true
    rmdir "$MNT/root" "$MNT" 2>/dev/null || true
    if [ -n "$LOOP" ]; then losetup -d "$LOOP"; fi
}
trap cleanup EXIT

wait_for() {  # a device node or link udev makes: give it a few seconds
    local i
    for i in $(seq 1 50); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    return 1
}

truncate -s 128M "$IMAGE"
LOOP=$(losetup -f --show -P "$IMAGE")

# sfdisk re-reads the table itself; partprobe once more, as many scripts do.
sfdisk -q "$LOOP" <<SFDISK
label: gpt
size=32MiB, type=linux, name=first
size=32MiB, type=linux, name=second
SFDISK
partprobe "$LOOP"
[ -b "${LOOP}p1" ] && [ -b "${LOOP}p2" ] && echo "partprobe: p1 p2"

# A third partition written without telling the kernel, then blockdev --rereadpt.
echo 'size=16MiB, type=linux, name=third' | sfdisk -q --append --no-reread --no-tell-kernel "$LOOP"
blockdev --rereadpt "$LOOP"
wait_for "${LOOP}p3"
echo "blockdev --rereadpt: p3"

# A fourth one, then partx -u.
echo 'type=linux, name=fourth' | sfdisk -q --append --no-reread --no-tell-kernel "$LOOP"
partx -u "$LOOP"
wait_for "${LOOP}p4"
echo "partx -u: p4"

mkfs.ext4 -q -L imgroot "${LOOP}p1"
udevadm settle
mkdir "$MNT/root"
mount /dev/disk/by-label/imgroot "$MNT/root"
echo "by-label after settle: $(readlink -f /dev/disk/by-label/imgroot)"

mkfs.vfat -n IMGEFI "${LOOP}p2" >/dev/null
EFI_UUID=$(blkid -s UUID -o value "${LOOP}p2")
wait_for "/dev/disk/by-uuid/$EFI_UUID"
mkdir -p "$MNT/root/boot/efi"
mount "/dev/disk/by-uuid/$EFI_UUID" "$MNT/root/boot/efi"
echo "by-uuid without settle: $(readlink -f "/dev/disk/by-uuid/$EFI_UUID")"

mkswap -L imgswap "${LOOP}p3" >/dev/null
udevadm settle --timeout=10
SWAP_UUID=$(blkid -s UUID -o value "${LOOP}p3")
ROOT_UUID=$(blkid -s UUID -o value "${LOOP}p1")
PART_UUID=$(blkid -s PARTUUID -o value "${LOOP}p4")
ls -l /dev/disk/by-partlabel/
[ "$(readlink -f /dev/disk/by-partlabel/fourth)" = "${LOOP}p4" ]
[ "$(readlink -f "/dev/disk/by-partuuid/$PART_UUID")" = "${LOOP}p4" ]
[ "$(readlink -f "/dev/disk/by-uuid/$SWAP_UUID")" = "${LOOP}p3" ]

cat >"$MNT/root/fstab.generated" <<FSTAB
/dev/disk/by-uuid/$ROOT_UUID / ext4 defaults 0 1
/dev/disk/by-uuid/$EFI_UUID /boot/efi vfat umask=0077 0 2
/dev/disk/by-uuid/$SWAP_UUID none swap sw 0 0
PARTUUID=$PART_UUID /srv ext4 defaults,nofail 0 2
FSTAB
cat "$MNT/root/fstab.generated"
umount -R "$MNT/root"
losetup -d "$LOOP"
LOOP=

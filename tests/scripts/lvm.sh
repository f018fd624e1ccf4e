#!/bin/sh
# lvm.sh - a volume group on a disk image, with an ext4 logical volume holding a file.
#
#   lvm.sh IMAGE [VG]
set -e

IMAGE=$1
VG=${2:-imagevg}

truncate -s 96M "$IMAGE"
LOOP=$(losetup -f --show "$IMAGE")
MNT=$(mktemp -d)

cleanup() {
    umount "$MNT" 2>/dev/null || true
    rmdir "$MNT"
    vgchange -an "$VG" >/dev/null 2>&1 || true
    losetup -d "$LOOP"
}
trap cleanup EXIT

pvcreate -ff -y "$LOOP"
vgcreate "$VG" "$LOOP"
lvcreate -y -L 48M -n data "$VG"
lvcreate -y -l 100%FREE -n spare "$VG"
lvs --noheadings -o lv_name,lv_size "$VG"

mkfs.ext4 -q -L lvdata "/dev/$VG/data"
mount "/dev/mapper/$VG-data" "$MNT"
echo "hello from $VG/data" >"$MNT/hello"
df -h "$MNT"
umount "$MNT"

vgchange -an "$VG"
echo "volume group $VG deactivated"

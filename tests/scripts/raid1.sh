#!/bin/sh
# raid1.sh - a RAID1 array of two disk images with an ext4 filesystem on it.
#
#   raid1.sh IMAGE1 IMAGE2
set -e

A=$1
B=$2
MD=/dev/md0

truncate -s 64M "$A" "$B"
LA=$(losetup -f --show "$A")
LB=$(losetup -f --show "$B")
MNT=$(mktemp -d)

cleanup() {
    umount "$MNT" 2>/dev/null || true
    rmdir "$MNT"
    [ -e "$MD" ] && mdadm --stop "$MD" 2>/dev/null || true
    losetup -d "$LA" "$LB"
}
trap cleanup EXIT

mdadm --create "$MD" --run --level=1 --raid-devices=2 --metadata=1.2 \
    --name=imageraid "$LA" "$LB"
cat /proc/mdstat
mkfs.ext4 -q -L raiddata "$MD"
mount "$MD" "$MNT"
echo "mirrored" >"$MNT/hello"
umount "$MNT"
mdadm --detail "$MD"
mdadm --stop "$MD"

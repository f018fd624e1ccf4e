#!/bin/bash
# chroot-workdir.sh - unpack a root tarball into ./chroot, finish it from inside (with
# /dev, /proc and /sys bound in, as debootstrap-style builders do), then pack it.
#
#   chroot-workdir.sh ROOT.tar IMAGE
set -euo pipefail

TARBALL=$1
IMAGE=$2
CHROOT=$PWD/chroot

teardown() {
    for fs in sys proc dev/pts dev; do
        if mountpoint -q "$CHROOT/$fs"; then
            umount -l "$CHROOT/$fs"
        fi
    done
}
trap teardown EXIT

rm -rf "$CHROOT"
mkdir -p "$CHROOT"
tar -C "$CHROOT" --numeric-owner -xpf "$TARBALL"

mount --bind /dev "$CHROOT/dev"
mount -t devpts devpts "$CHROOT/dev/pts" 2>/dev/null || mount --bind /dev/pts "$CHROOT/dev/pts"
mount -t proc proc "$CHROOT/proc"
mount -t sysfs sysfs "$CHROOT/sys"

chroot "$CHROOT" /bin/sh -c '
    set -e
    uname -m >/etc/built-on
    ls /dev/null /proc/self/exe /sys/kernel >/dev/null
    echo ok >/var/lib/chroot-ok
    ln -s /usr/bin/dash /usr/bin/ash
'
echo "inside: $(cat "$CHROOT/etc/built-on")"

umount -R "$CHROOT/dev"
umount "$CHROOT/proc" "$CHROOT/sys"
mkfs.ext4 -q -F -L chrootfs -d "$CHROOT" "$IMAGE" 32M
echo "$IMAGE packed"

#!/bin/sh
# rootfs-ext4.sh - unpack a root tarball into ./rootfs and pack it into an ext4 image
# (mkfs.ext4 -d), as image builders that work without loop devices do.
#
#   rootfs-ext4.sh ROOT.tar IMAGE [SIZE]
set -e

TARBALL=$1
IMAGE=$2
SIZE=${3:-64M}

rm -rf rootfs
mkdir rootfs
tar -x --numeric-owner -p --xattrs --xattrs-include='*' -f "$TARBALL" -C rootfs

# Adjust the tree as a builder does before packing it.
echo "packed-host" >rootfs/etc/hostname
chown 0:0 rootfs/etc/hostname
install -d -m 0750 -o 0 -g 4 rootfs/var/log/audit
mknod -m 0600 rootfs/dev/console c 5 1
chmod 4711 rootfs/usr/bin/passwd

ls -ln rootfs/dev rootfs/usr/bin
rm -f "$IMAGE"
mkfs.ext4 -q -F -L rootfs -N 256 -d rootfs "$IMAGE" "$SIZE"
echo "$IMAGE: $(blkid -o value -s TYPE "$IMAGE")"

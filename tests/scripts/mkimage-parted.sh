#!/bin/sh
# mkimage-parted.sh - build a partitioned disk image from a root tarball.
#
#   mkimage-parted.sh msdos|gpt ROOT.tar IMAGE [SIZE]
#
# Partitions with parted on a loop device, maps them with kpartx, formats them, fills
# the root from the tarball, writes /etc/fstab from blkid and finishes the new root from
# inside it (chroot with /dev, /proc and /sys bound in). Run as root.
set -eu

LABEL=$1
TARBALL=$2
IMAGE=$3
SIZE=${4:-192M}

LOOP=
MNT=

cleanup() {
    set +e
    if [ -n "$MNT" ]; then
        umount -R "$MNT" 2>/dev/null
        rmdir "$MNT"
    fi
    if [ -n "$LOOP" ]; then
        kpartx -d "$LOOP"
        losetup -d "$LOOP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -f "$IMAGE"
truncate -s "$SIZE" "$IMAGE"
LOOP=$(losetup -f --show "$IMAGE")
echo "I: image on $LOOP"

case $LABEL in
msdos)
    parted -s "$LOOP" mklabel msdos
    parted -s -a optimal "$LOOP" mkpart primary ext4 1MiB 48MiB
    parted -s -a optimal "$LOOP" mkpart primary ext4 48MiB 100%
    parted -s "$LOOP" set 1 boot on
    BOOTDIR=/boot
    ;;
gpt)
    parted -s -a optimal "$LOOP" -- mklabel gpt \
        mkpart ESP fat32 1MiB 48MiB \
        set 1 esp on \
        mkpart root ext4 48MiB -34s
    BOOTDIR=/boot/efi
    ;;
*)
    echo "E: unknown label type $LABEL" >&2
    exit 2
    ;;
esac
parted -s "$LOOP" print

# The loop device was set up without partition scanning: map the partitions.
kpartx -a -s -v "$LOOP"
MAPPER=/dev/mapper/$(basename "$LOOP")
BOOTPART=${MAPPER}p1
ROOTPART=${MAPPER}p2

if [ "$LABEL" = gpt ]; then
    mkfs.vfat -F 32 -n EFI "$BOOTPART"
    BOOTFS=vfat
    BOOTOPTS=umask=0077
else
    mkfs.ext4 -q -L boot "$BOOTPART"
    BOOTFS=ext4
    BOOTOPTS=defaults
fi
mkfs.ext4 -q -L root "$ROOTPART"

MNT=$(mktemp -d)
mount "$ROOTPART" "$MNT"
mkdir -p "$MNT$BOOTDIR"
mount "$BOOTPART" "$MNT$BOOTDIR"

echo "I: unpacking $TARBALL"
tar -x -p --numeric-owner -f "$TARBALL" -C "$MNT"

ROOT_UUID=$(blkid -s UUID -o value "$ROOTPART")
BOOT_UUID=$(blkid -s UUID -o value "$BOOTPART")
cat >"$MNT/etc/fstab" <<FSTAB
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=$ROOT_UUID / ext4 errors=remount-ro 0 1
UUID=$BOOT_UUID $BOOTDIR $BOOTFS $BOOTOPTS 0 2
FSTAB

for fs in dev proc sys; do
    mount --bind "/$fs" "$MNT/$fs"
done

# Finish the system from inside, with its own programs and libraries.
chroot "$MNT" /bin/sh -s <<'INCHROOT'
set -e
echo "arch=$(uname -m)" >/etc/image-info
if [ -c /dev/null ]; then echo dev=ok >>/etc/image-info; fi
while read -r dev dir type rest; do
    if [ "$dir" = / ]; then echo "proc=$type" >>/etc/image-info; fi
done </proc/self/mounts
for d in /sys/class/block/dm-*; do
    if [ -e "$d/dm/name" ]; then echo sys=ok >>/etc/image-info; fi
    break
done
ls /usr/bin >/etc/programs
echo imagehost >/etc/hostname
INCHROOT

echo "I: cleaning up"
umount -R "$MNT"
rmdir "$MNT"
MNT=
kpartx -d "$LOOP"
losetup -d "$LOOP"
LOOP=
echo "I: $IMAGE done"

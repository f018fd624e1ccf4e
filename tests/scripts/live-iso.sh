#!/bin/sh
# live-iso.sh - a live-style ISO: a root tree squashed with mksquashfs, put on an ISO
# 9660 image, and both loop-mounted to check them before release.
#
#   live-iso.sh OUTNAME
set -eu

OUT=$1
WORK=$(mktemp -d)
trap 'umount -R "$WORK/iso" 2>/dev/null || true; umount "$WORK/sq" 2>/dev/null || true; rm -rf "$WORK"' EXIT

mkdir -p "$WORK/tree/etc" "$WORK/tree/usr/bin" "$WORK/cd/live" "$WORK/iso" "$WORK/sq"
echo "live system" >"$WORK/tree/etc/issue"
cp /etc/os-release "$WORK/tree/etc/os-release"
cp /usr/bin/env "$WORK/tree/usr/bin/env"
ln -s ../usr/bin "$WORK/tree/bin"

mksquashfs "$WORK/tree" "$WORK/cd/live/filesystem.squashfs" -noappend -comp xz -all-root -quiet
cp "$WORK/cd/live/filesystem.squashfs" "$OUT.squashfs"
echo "live system image" >"$WORK/cd/README"

xorriso -as mkisofs -quiet -r -J -V LIVE_TEST -o "$OUT.iso" "$WORK/cd"

mount -o loop,ro "$OUT.iso" "$WORK/iso"
mount -t squashfs -o loop,ro "$WORK/iso/live/filesystem.squashfs" "$WORK/sq"
cmp "$WORK/sq/usr/bin/env" /usr/bin/env
cat "$WORK/sq/etc/issue" "$WORK/iso/README"
find "$WORK/sq" | sed "s|^$WORK/sq||" | sort >"$OUT.files"
umount "$WORK/sq"
umount "$WORK/iso"
echo "$OUT.iso and $OUT.squashfs checked"

#!/bin/bash
# luks.sh - an encrypted (LUKS2) disk image with an ext4 filesystem inside.
#
#   luks.sh IMAGE KEYFILE
set -euo pipefail

IMAGE=$1
KEYFILE=$2
NAME=luks-image-$$

truncate -s 64M "$IMAGE"
LOOP=$(losetup -f --show "$IMAGE")
MNT=$(mktemp -d)

cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    rmdir "$MNT"
    [ -e "/dev/mapper/$NAME" ] && cryptsetup close "$NAME"
    losetup -d "$LOOP"
}
trap cleanup EXIT

# Small argon2 memory: the image is opened on small machines (and in CI).
cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 \
    --pbkdf argon2id --pbkdf-memory 32768 --pbkdf-parallel 1 --pbkdf-force-iterations 4 \
    --label imagecrypt --key-file "$KEYFILE" "$LOOP"
cryptsetup open --type luks2 --key-file "$KEYFILE" "$LOOP" "$NAME"
cryptsetup status "$NAME"

mkfs.ext4 -q -L cryptdata "/dev/mapper/$NAME"
mount "/dev/mapper/$NAME" "$MNT"
echo "secret payload" >"$MNT/secret"
umount "$MNT"

cryptsetup close "$NAME"
echo "closed $NAME"
# The header as cryptsetup reads it from the image file itself.
cryptsetup isLuks --type luks2 "$IMAGE"
cryptsetup luksDump "$IMAGE" | grep -E '^(Version|Label):'

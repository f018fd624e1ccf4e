#!/bin/sh
# gnu-tools.sh - the GNU coreutils and util-linux options image scripts lean on, with the
# results written to REPORTDIR for a later stage of the build to read.
#
#   gnu-tools.sh REPORTDIR
set -eu

REPORT=$1
mkdir -p "$REPORT"

TMPDIR_=$(mktemp --tmpdir -d vmroot-XXXXX)
LOOP=
cleanup() {
    [ -z "$LOOP" ] || losetup -d "$LOOP"
    rm -rf "$TMPDIR_"
}
trap cleanup EXIT

echo "$TMPDIR_" >"$REPORT/mktemp"
arch >"$REPORT/arch"
for prog in losetup mktemp mount tar find sed stat dd install sfdisk lsblk blkid; do
    command -v "$prog"
done >"$REPORT/commands"
tar --version | head -n 1 >"$REPORT/versions"
sed --version | head -n 1 >>"$REPORT/versions"
find --version | head -n 1 >>"$REPORT/versions"

install -D -m 0640 /etc/os-release "$TMPDIR_/etc/deep/os-release"
install -D -m 0755 -d "$TMPDIR_/usr/lib/deep"
find "$TMPDIR_" -mindepth 1 -printf '%M %m %u %P\n' | sort >"$REPORT/find"
stat -c '%a %U:%G %F %n' "$TMPDIR_/etc/deep/os-release" >"$REPORT/stat"
sed -i -e 's/^ID=.*/ID=imagebuilder/' -e '/^HOME_URL=/d' "$TMPDIR_/etc/deep/os-release"
grep -E '^(ID|HOME_URL)=' "$TMPDIR_/etc/deep/os-release" >"$REPORT/sed" || true

dd if=/dev/zero of="$TMPDIR_/disk.img" bs=1M count=0 seek=64 status=none
dd if=/dev/urandom of="$TMPDIR_/seed" bs=512 count=1 status=none
printf 'label: gpt\nsize=16MiB, type=linux, name=data\nsize=+, type=linux, name=rest\n' |
    sfdisk --quiet "$TMPDIR_/disk.img"
sfdisk --json "$TMPDIR_/disk.img" >"$REPORT/sfdisk.json"

LOOP=$(losetup --show -f -P "$TMPDIR_/disk.img")
mkfs.ext4 -q -L gnudata "${LOOP}p1"
udevadm settle
lsblk -J -b -o NAME,SIZE,TYPE,FSTYPE,LABEL,UUID,PARTLABEL,PTTYPE "$LOOP" >"$REPORT/lsblk.json"
lsblk -no UUID "${LOOP}p1" >"$REPORT/lsblk-uuid"
blkid -o export "${LOOP}p1" >"$REPORT/blkid"
losetup -d "$LOOP"
LOOP=
echo "report in $REPORT"

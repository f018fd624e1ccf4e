#!/bin/sh
# mkimage-loop.sh: mkimage.sh's image, built on a file through a loop device.
#
# The way many existing image scripts work: a file made with truncate, a loop device
# with partition scanning on it, and the partitions as /dev/loopNpM. No attached disk
# is needed: the file is written in the shared working directory.
set -eu

prog=mkimage-loop.sh
say() { echo "$prog: $*" >&2; }

usage() {
    cat <<'HELP'
usage: mkimage-loop.sh [--size SIZE] [mkimage.sh OPTIONS] ROOT OUTPUT

Build the image in a file through a loop device, as root in the hshelper VM:

  helper-run --disk root.tar,ro,name=src \
      recipes/mkimage-loop.sh --size 1G /dev/disk/hshelper/src disk.img

  --size SIZE   the image's size (default: 2G; truncate's suffixes: K, M, G)
  -h, --help    this help

The image is written to OUTPUT.part (a sparse file), attached with losetup -fP, built
by mkimage.sh --device /dev/loopN, detached, and renamed to OUTPUT only when every step
succeeded; a failure removes OUTPUT.part. All other options are mkimage.sh's (--table,
--fs, --bootloader, --append, --qcow2, --sha256, --seed, ...): see mkimage.sh --help.

Reproducible images: set SOURCE_DATE_EPOCH (or give --seed SEED) and the same inputs
give the same image, byte for byte; without either every image gets fresh random
identifiers (mkimage.sh --help says what is derived and how).
HELP
}

size=2G
if [ "${1:-}" = --size ]; then
    [ "$#" -ge 2 ] || { say "--size needs a value"; exit 2; }
    size=$2
    shift 2
fi
case ${1:-} in -h | --help) usage; exit 0 ;; esac
[ "$#" -ge 2 ] || { say "ROOT and OUTPUT are required  (see --help)"; exit 2; }
for output; do :; done  # OUTPUT is the last argument
case $output in -*) say "OUTPUT is missing  (see --help)"; exit 2 ;; esac
part_file=$output.part
[ ! -e "$part_file" ] || { say "$part_file exists: remove it first"; exit 1; }

loop=
cleanup() {
    status=$?
    set +e
    [ -z "$loop" ] || losetup -d "$loop"
    # mkimage.sh removes OUTPUT.part itself when it fails; this covers the steps before.
    [ "$status" -eq 0 ] || rm -f "$part_file"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

truncate -s "$size" "$part_file"
loop=$(losetup -fP --show "$part_file")
say "building on $loop ($part_file, $size)"
sh "$(dirname "$0")/mkimage.sh" --device "$loop" "$@"

#!/bin/sh
# mkimage.sh: a bootable raw disk image from a root filesystem (directory or tarball).
#
# Runs as root inside the hshelper VM, with only the programs of the helper image
# (busybox or coreutils, util-linux, e2fsprogs, dosfstools). POSIX sh. See --help and
# docs/recipes.md. The bootloader comes from the root filesystem itself.
set -eu

prog=mkimage.sh
# Under TCG, qemu emulates `rep movsb` slowly, and glibc copies large blocks with it
# (ERMS). A higher threshold makes glibc copy with vector loops, which TCG translates
# well: tar's extraction of 100 MB took 7.6 s instead of 11.5 s. Natively either is fast.
GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.cpu.x86_rep_movsb_threshold=2147483647:glibc.cpu.x86_rep_stosb_threshold=2147483647
export GLIBC_TUNABLES

usage() {
    cat <<'EOF'
usage: mkimage.sh [OPTIONS] ROOT [OUTPUT]

Build a bootable disk image from a root filesystem, as root in the hshelper VM:

  helper-run --disk root.tar,ro,name=src --disk disk.img.part,size=2G,name=out \
      recipes/mkimage.sh /dev/disk/hshelper/src disk.img

or, from the installed package (the disk attached and the root filled on the host):

  helper-run --recipe mkimage --size 2G root.tar disk.img

ROOT    the root filesystem: a directory, a tar archive (plain, or compressed with
        gzip, xz, zstd or bzip2), or a tarball attached as a disk (--disk
        root.tar,ro,name=src, ROOT /dev/disk/hshelper/src: the fastest way in;
        compressed ones too, as hshelper tells the guest their exact size).
OUTPUT  the image's final path. The disk the image is built on (--device) must be
        attached from OUTPUT.part (--disk OUTPUT.part,size=SIZE,name=out; its size is
        the image's size). OUTPUT.part becomes OUTPUT only when everything succeeded,
        and is removed when anything failed. Without OUTPUT the image stays on the
        device, and a failure wipes its partition table.

Options:
  --device DEV         the disk to build on (default: $HSHELPER_DISK_OUT, the disk
                       attached with name=out)
  --table gpt|mbr      partition table (default: gpt). gpt: an EFI system partition
                       (FAT32) and the root; mbr: one bootable root partition
  --esp-size SIZE      size of the EFI system partition, gpt only (default: 256MiB)
  --fs ext4|xfs|btrfs  root filesystem (default: ext4; xfs and btrfs need their mkfs in
                       the helper image: install xfsprogs / btrfs-progs in the build root)
  --label LABEL        root filesystem label (default: root)
  --root-uuid UUID     the root filesystem's UUID (default: a new random one)
  --root-partuuid ID   the root partition's PARTUUID (default: random): a UUID with
                       gpt, DISKID-01 (8 hex digits, the disk identifier) with mbr
  --bootloader NAME    auto, systemd-boot, grub, extlinux or none (default: auto:
                       gpt: systemd-boot when ROOT has it, else GRUB's EFI image
                       installed at the removable path; mbr: extlinux)
  --kernel VERSION     the kernel to boot (default: the one /vmlinuz points to, else
                       the last /boot/vmlinuz-*)
  --append WORDS       extra kernel command-line words (repeatable)
  --console WORDS      console words of the command line (default for x86:
                       "console=tty0 console=ttyS0,115200", for aarch64 ttyAMA0,
                       the architecture's serial console elsewhere; "" for none)
  --arch ARCH          the image's architecture: x86_64, aarch64, riscv64, i686,
                       ppc64le, s390x (default: this VM's, which is the build
                       root's): the root partition's type, the EFI boot file
                       (BOOTX64.EFI, BOOTAA64.EFI, BOOTRISCV64.EFI, BOOTIA32.EFI)
  --qcow2 FILE         also write a qcow2 copy (needs qemu-img in the helper image:
                       helper-run --with qemu-img)
  --sha256             write OUTPUT.sha256 (and FILE.sha256 with --qcow2)
  --size SIZE          the image's size (K, M, G, T: powers of 1024). helper-run
                       --recipe mkimage attaches OUTPUT.part of this size itself; else
                       the attached disk must have it
  --prefilled          the disk already holds the partition table, the populated
                       ext4 root and, with --esp-id, the ESP's FAT32 filesystem
                       (helper-run --recipe mkimage writes them natively on the
                       host, much faster than the VM can): only /etc/fstab and the
                       bootloader are done here; ROOT is not read. --root-uuid and
                       --root-partuuid then say what the disk has (else they are
                       read from it)
  --esp-id ID          the ESP's FAT volume id (8 hex digits; default: random)
  --seed SEED          build a reproducible image (below) with identifiers derived
                       from SEED (any text without a newline)
  --root-sha256 HEX    the sha256 of ROOT, as the identifiers are derived from it
                       (default: computed here; helper-run --recipe gives it)
  -h, --help           show this help

The root filesystem's /etc/fstab is replaced (root and ESP by UUID); the kernel finds
the root by PARTUUID. Exit status: 0 done, 1 a step failed, 2 bad usage.

Reproducible images: with SOURCE_DATE_EPOCH set in the environment, or --seed, the
same inputs give the same image, byte for byte (ext4 root only). Every identifier not
given (disk and partition GUIDs, filesystem UUIDs, the FAT volume id, the ext4 hash
seed) is derived from the seed (default: SOURCE_DATE_EPOCH's value), the sha256 of
ROOT (a tarball; a directory adds nothing) and the table type; every time the build
makes is SOURCE_DATE_EPOCH (default with --seed alone: 1980-01-01, FAT's first day).
The root is then written by mke2fs -d (in the guest's memory first for a tarball: give
helper-run --memory when ROOT is large) and the ESP with mtools. Without either, every
image gets fresh random identifiers. helper-run --report records the seed and
SOURCE_DATE_EPOCH; docs/recipes.md tells how to check a rebuild.
EOF
}

say() { echo "$prog: $*" >&2; }
# Progress with the guest's uptime: under TCG every step's cost shows.
step() { say "[$(cut -d' ' -f1 /proc/uptime 2>/dev/null || echo ?)s] $*"; }
die() { say "$*"; exit 1; }
usage_error() { say "$*  (see --help)"; exit 2; }

# ---------------------------------------------------------------- options
device=${HSHELPER_DISK_OUT:-}
table=gpt
esp_size=256MiB
fs=ext4
label=root
bootloader=auto
kernel=
append=
console=default
arch=$(uname -m)
qcow2=
want_sha=
size=
prefilled=
root_uuid=
root_partuuid=
esp_id=
seed=
root_digest=
root_bytes=
root=
output=

need_arg() { [ "$#" -ge 2 ] || usage_error "$1 needs a value"; }
while [ "$#" -gt 0 ]; do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --device) need_arg "$@"; device=$2; shift ;;
    --table) need_arg "$@"; table=$2; shift ;;
    --esp-size) need_arg "$@"; esp_size=$2; shift ;;
    --fs) need_arg "$@"; fs=$2; shift ;;
    --label) need_arg "$@"; label=$2; shift ;;
    --bootloader) need_arg "$@"; bootloader=$2; shift ;;
    --kernel) need_arg "$@"; kernel=$2; shift ;;
    --arch) need_arg "$@"; arch=$2; shift ;;
    --append) need_arg "$@"; append="${append:+$append }$2"; shift ;;
    --console) need_arg "$@"; console=$2; shift ;;
    --qcow2) need_arg "$@"; qcow2=$2; shift ;;
    --sha256) want_sha=1 ;;
    --size) need_arg "$@"; size=$2; shift ;;
    --prefilled) prefilled=1 ;;
    --root-uuid) need_arg "$@"; root_uuid=$2; shift ;;
    --root-partuuid) need_arg "$@"; root_partuuid=$2; shift ;;
    --esp-id) need_arg "$@"; esp_id=$2; shift ;;
    --seed) need_arg "$@"; seed=$2; shift ;;
    --root-sha256) need_arg "$@"; root_digest=$2; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option $1" ;;
    *) break ;;
    esac
    shift
done
[ "$#" -ge 1 ] || usage_error "no ROOT given"
[ "$#" -le 2 ] || usage_error "too many arguments: $*"
root=$1
output=${2:-}

# ---------------------------------------------------------------- cleanup
# From here on a failure removes OUTPUT.part (the recipe's own name for the image
# until it is complete) and every other .part file of this run.
part_file=${output:+$output.part}
work=
mnt=
esp_mnt=
tree_mnt=
touched=
finished=
cleanup() {
    status=$?
    set +e
    [ -z "$esp_mnt" ] || umount "$esp_mnt" 2>/dev/null
    if [ -n "$mnt" ]; then
        for m in "$mnt/dev" "$mnt/proc" "$mnt/sys"; do umount "$m" 2>/dev/null; done
        umount "$mnt" 2>/dev/null
    fi
    [ -z "$tree_mnt" ] || umount "$tree_mnt" 2>/dev/null
    if [ -z "$finished" ]; then
        [ "$status" -ne 0 ] || status=1
        # Nothing that looks like a good image may stay behind.
        if [ -n "$part_file" ]; then
            rm -f "$part_file"
        elif [ -n "$touched" ]; then
            dd if=/dev/zero of="$dev" bs=1M count=1 conv=notrunc 2>/dev/null
            dd if=/dev/zero of="$dev" bs=512 seek=$((dev_bytes / 512 - 34)) count=34 \
                conv=notrunc 2>/dev/null
        fi
        rm -f "${qcow2:+$qcow2.part}" "${qcow2:+$qcow2.sha256.part}" \
            "${output:+$output.sha256.part}"
        say "failed; no image was written"
    fi
    [ -z "$work" ] || rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the options' values
# Checked before anything is read or written.
nl='
'
# Bytes of a size in sfdisk's units: a bare number counts sectors; K, M, G, T (and KiB,
# MiB, ...) are powers of 1024, KB, MB, GB, TB powers of 1000.
size_bytes() {
    n=${1%%[!0-9]*}
    [ -n "$n" ] || return 1
    case ${1#"$n"} in
    '') echo $((n * 512)) ;;
    K | k | KiB) echo $((n * 1024)) ;;
    M | m | MiB) echo $((n * 1048576)) ;;
    G | g | GiB) echo $((n * 1073741824)) ;;
    T | t | TiB) echo $((n * 1099511627776)) ;;
    KB) echo $((n * 1000)) ;;
    MB) echo $((n * 1000000)) ;;
    GB) echo $((n * 1000000000)) ;;
    TB) echo $((n * 1000000000000)) ;;
    *) return 1 ;;
    esac
}
case $table in gpt | mbr) ;; *) usage_error "--table must be gpt or mbr" ;; esac
case $fs in ext4 | xfs | btrfs) ;; *) usage_error "--fs must be ext4, xfs or btrfs" ;; esac
esp_bytes=$(size_bytes "$esp_size") && [ "$esp_bytes" -gt 0 ] ||
    usage_error "--esp-size: a size like 256MiB, 100M or 1G"
hex='[0-9a-fA-F]'
h4=$hex$hex$hex$hex
uuid_glob="$h4$h4-$h4-$h4-$h4-$h4$h4$h4"
# shellcheck disable=SC2254
case $root_uuid in '' | $uuid_glob) ;; *) usage_error "--root-uuid: not a UUID: $root_uuid" ;; esac
# shellcheck disable=SC2254
case $esp_id in '' | $h4$h4) ;; *) usage_error "--esp-id: 8 hex digits, not $esp_id" ;; esac
if [ -n "$root_partuuid" ]; then
    # shellcheck disable=SC2254
    case $table-$root_partuuid in
    gpt-$uuid_glob | mbr-$h4$h4-01) ;;
    gpt-*) usage_error "--root-partuuid: not a UUID: $root_partuuid" ;;
    *) usage_error "--root-partuuid with --table mbr: DISKID-01 (8 hex digits), not $root_partuuid" ;;
    esac
fi
# What differs per architecture (hshelper's machine table has the same rows): the
# root partition's type (Discoverable Partitions Specification), the EFI names, the
# serial console.
case $arch in
x86_64 | amd64)
    arch=x86_64 root_type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 efi=x64 EFI_BOOT=BOOTX64.EFI
    grub_dir=x86_64-efi grub_pkg=grub-efi-amd64-bin serial="console=tty0 console=ttyS0,115200" ;;
aarch64 | arm64)
    arch=aarch64 root_type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE efi=aa64 EFI_BOOT=BOOTAA64.EFI
    grub_dir=arm64-efi grub_pkg=grub-efi-arm64-bin serial="console=ttyAMA0" ;;
riscv64)
    root_type=72EC70A6-CF74-40E6-BD49-4BDA08E8F224 efi=riscv64 EFI_BOOT=BOOTRISCV64.EFI
    grub_dir=riscv64-efi grub_pkg=grub-efi-riscv64-bin serial="console=ttyS0" ;;
i686 | i586 | i386)
    arch=i686 root_type=44479540-F297-41B2-9AF7-D131D5F0458A efi=ia32 EFI_BOOT=BOOTIA32.EFI
    grub_dir=i386-efi grub_pkg=grub-efi-ia32-bin serial="console=tty0 console=ttyS0,115200" ;;
ppc64le | ppc64el)
    arch=ppc64le root_type=C31C45E6-3F39-412E-80FB-4809C4980599 efi= serial="console=hvc0" ;;
s390x)
    root_type=5EEAD9A9-FE09-4A1E-A1D7-520D00531306 efi= serial="console=ttysclp0" ;;
*) usage_error "--arch $arch: no image layout for this architecture" ;;
esac
[ "$console" != default ] || console=$serial

case $bootloader in
auto) if [ "$table" = gpt ]; then bootloader=efi-auto; else bootloader=extlinux; fi ;;
systemd-boot | grub) [ "$table" = gpt ] || usage_error "$bootloader needs --table gpt" ;;
extlinux | none) ;;
*) usage_error "--bootloader must be auto, systemd-boot, grub, extlinux or none" ;;
esac
[ -z "$prefilled" ] || [ "$fs" = ext4 ] ||
    usage_error "--prefilled: the prefilled root is ext4 (not --fs $fs)"
[ -z "$want_sha" ] || [ -n "$output" ] ||
    usage_error "--sha256 needs OUTPUT (the checksum names the file)"

# Reproducible images: identifiers from the seed, times from SOURCE_DATE_EPOCH.
repro=
epoch=
case $seed in *"$nl"*) usage_error "--seed: one line of text" ;; esac
case ${SOURCE_DATE_EPOCH:-} in
'') ;;
*[!0-9]*) usage_error "SOURCE_DATE_EPOCH must be seconds since 1970, not $SOURCE_DATE_EPOCH" ;;
*) epoch=$SOURCE_DATE_EPOCH ;;
esac
if [ -n "$seed$epoch" ]; then
    repro=1
    [ -n "$seed" ] || seed=$epoch
    [ -n "$epoch" ] || epoch=315532800  # 1980-01-01, the first day FAT can store
    [ "$fs" = ext4 ] ||
        usage_error "reproducible images (--seed, SOURCE_DATE_EPOCH) need --fs ext4, not $fs"
fi
# shellcheck disable=SC2254
case $root_digest in
'' | $h4$h4$h4$h4$h4$h4$h4$h4$h4$h4$h4$h4$h4$h4$h4$h4) ;;
*) usage_error "--root-sha256: 64 hex digits, not $root_digest" ;;
esac
[ -z "$root_digest" ] || root_digest=$(echo "$root_digest" | tr A-F a-f)  # as sha256sum

# ---------------------------------------------------------------- the disk
[ -n "$device" ] || usage_error "no disk to build on: attach one (--disk FILE,size=SIZE,name=out) or give --device"
[ -e "$device" ] || die "$device does not exist (is the disk attached? --disk FILE,name=out)"
dev=$(readlink -f "$device")
[ -b "$dev" ] || die "$device is not a block device"
devname=${dev##*/}
dev_bytes=$(( $(cat "/sys/class/block/$devname/size") * 512 ))
if [ -n "$size" ]; then
    # truncate's and hshelper's units: powers of 1024.
    n=${size%%[!0-9]*}
    case ${size#"$n"} in
    '' | B) mult=1 ;;
    K | KB | KiB | k) mult=1024 ;;
    M | MB | MiB | m) mult=1048576 ;;
    G | GB | GiB | g) mult=1073741824 ;;
    T | TB | TiB | t) mult=1099511627776 ;;
    *) n= ;;
    esac
    [ -n "$n" ] || usage_error "--size: a size like 2G, 512M or 1073741824"
    [ $((n * mult)) -eq "$dev_bytes" ] ||
        die "--size $size is $((n * mult)) bytes, but $device has $dev_bytes"
fi
if [ -n "$output" ]; then
    [ -f "$part_file" ] ||
        die "OUTPUT is built on $part_file, which does not exist: attach the disk with --disk $part_file,size=SIZE,name=out"
    # The disk must really be that file: compare sizes (the guest cannot see the
    # disk's backing file, and a mismatch means the wrong --disk).
    part_bytes=$(stat -c %s "$part_file")
    [ "$part_bytes" -eq "$dev_bytes" ] ||
        die "$device ($dev_bytes bytes) is not $part_file ($part_bytes bytes): attach $part_file as the disk"
    [ ! -d "$output" ] || die "OUTPUT $output is a directory"
fi
if [ -z "$prefilled" ]; then
    # The root partition gets what the ESP leaves, less 1 MiB of alignment at the start
    # and the backup GPT at the end.
    if [ "$table" = gpt ]; then
        root_space=$((dev_bytes - esp_bytes - 2097152))
        after=" after the $esp_size ESP"
    else
        root_space=$((dev_bytes - 1048576))
        after=
    fi
    [ "$root_space" -ge 8388608 ] ||
        usage_error "the $dev_bytes-byte disk leaves no room for the root (at least 8 MiB)$after: a larger --size, or a smaller --esp-size"
fi

# ---------------------------------------------------------------- the input
work=$(mktemp -d /tmp/mkimage.XXXXXX)
mnt=$work/root
if [ -n "$prefilled" ]; then
    root_kind=prefilled
elif [ -d "$root" ]; then
    root_kind=dir
elif [ -f "$root" ] || [ -b "$root" ]; then
    magic=$(head -c 6 "$root" | od -An -tx1 | tr -d ' \n')
    case $magic in
    1f8b*) root_kind=gzip ;;
    fd377a585a00) root_kind=xz ;;
    28b52ffd*) root_kind=zstd ;;
    425a68*) root_kind=bzip2 ;;
    *)
        [ "$(head -c 262 "$root" | tail -c 5)" = ustar ] ||
            die "ROOT $root is neither a directory nor a tar archive"
        root_kind=tar
        ;;
    esac
    if [ -b "$root" ]; then
        # A disk is padded to whole sectors, which compressed streams reject (and which
        # the tarball's checksum must not see): read the file's own bytes only, which
        # hshelper gives for its disks.
        case $root in
        /dev/disk/hshelper/*)
            var=HSHELPER_DISK_$(echo "${root##*/}" | tr 'a-z-' 'A-Z_')_BYTES
            eval "root_bytes=\${$var:-}"
            ;;
        esac
        [ -n "$root_bytes" ] || [ "$root_kind" = tar ] ||
            die "ROOT $root: a compressed tarball as a disk needs its size (attach it with helper-run --disk FILE,ro,name=NAME and give /dev/disk/hshelper/NAME), or give a plain tar"
    fi
else
    die "ROOT $root does not exist"
fi
case $root_kind in
tar | dir | prefilled) ;;
*) command -v "$root_kind" >/dev/null ||
    die "$root_kind is not in the helper image: decompress ROOT first, or helper-run --with $root_kind" ;;
esac

mkfs_prog=mkfs.$fs
command -v "$mkfs_prog" >/dev/null ||
    die "$mkfs_prog is not in the helper image (install $( [ "$fs" = xfs ] && echo xfsprogs || echo btrfs-progs) in the build root)"
if [ -n "$qcow2" ]; then
    command -v qemu-img >/dev/null ||
        die "--qcow2 needs qemu-img in the helper image: helper-run --with qemu-img ..."
fi
if [ -n "$want_sha" ]; then
    command -v sha256sum >/dev/null || die "sha256sum is not in the helper image"
fi
if [ -n "$repro" ]; then
    for tool in debugfs e2fsck tune2fs sha256sum awk; do
        command -v "$tool" >/dev/null ||
            die "$tool is not in the helper image, which a reproducible image needs (install e2fsprogs in the build root, or helper-run --with $tool)"
    done
    if [ "$table" = gpt ] && [ "$bootloader" != none ]; then
        command -v mcopy >/dev/null && command -v mmd >/dev/null ||
            die "a reproducible ESP is written with mtools, which is not in the helper image (install mtools in the build root)"
    fi
fi

# ---------------------------------------------------------------- identifiers
uuid() { cat /proc/sys/kernel/random/uuid; }
hex8() { uuid | tr -d '-' | cut -c1-8; }

if [ -n "$repro" ]; then
    # One CPU from here on: ext4 preallocates per CPU, so small files would land where
    # the CPU the writer happened to run on had its space.
    for c in /sys/devices/system/cpu/cpu[1-9]*/online; do
        if [ -w "$c" ]; then echo 0 >"$c"; fi
    done
    # e2fsprogs' creation and write times; mtools' times (FAT starts in 1980), in UTC.
    export E2FSPROGS_FAKE_TIME="$epoch" TZ=UTC0 MTOOLS_SKIP_CHECK=1
    SOURCE_DATE_EPOCH=$epoch
    [ "$SOURCE_DATE_EPOCH" -ge 315532800 ] || SOURCE_DATE_EPOCH=315532800
    export SOURCE_DATE_EPOCH
fi

# The identifiers of a reproducible image: the seed, ROOT's sha256 and the table type
# hashed with each one's role (hshelper/reproducible.py derives the same on the host).
derive_ids() {
    if [ -z "$root_digest" ] && [ "$root_kind" != dir ]; then
        step "hashing ROOT for the identifiers"
        if [ -n "$root_bytes" ]; then
            root_digest=$(head -c "$root_bytes" "$root" | sha256sum | awk '{ print $1 }')
        else
            root_digest=$(sha256sum <"$root" | awk '{ print $1 }')
        fi
    fi
    set -- disk esp-part root-part root-fs esp-fs hash-seed
    for role; do
        printf 'hshelper-mkimage 1\nseed %s\nroot %s\ntable %s\nrole %s\n' \
            "$seed" "$root_digest" "$table" "$role" >"$work/id.$role"
    done
    # One sha256sum and one awk for all of them: each program start costs under TCG.
    eval "$(cd "$work" && sha256sum id.disk id.esp-part id.root-part id.root-fs id.esp-fs \
        id.hash-seed | awk '{
            h = $1; r = $2; sub(/^id\./, "", r); gsub(/-/, "_", r)
            v = substr("89ab89ab89ab89ab", index("0123456789abcdef", substr(h, 17, 1)), 1)
            printf "id_%s=%s-%s-4%s-%s%s-%s\n", r, substr(h, 1, 8), substr(h, 9, 4),
                substr(h, 14, 3), v, substr(h, 18, 3), substr(h, 21, 12)
            printf "hex_%s=%s\n", r, substr(h, 1, 8)
        }')"
}

# The FAT volume label entry (the root directory's first) dated like everything else:
# mkfs.fat --invariant gives it a fixed date of its own.
fat_stamp_label() {
    # shellcheck disable=SC2046
    set -- $(od -An -tu1 -j11 -N38 "$1")
    bps=$(($1 + $2 * 256))
    first=$(( ($4 + $5 * 256 + $6 * (${26} + ${27} * 256 + ${28} * 65536 + ${29} * 16777216)
        + (${34} + ${35} * 256 + ${36} * 65536 + ${37} * 16777216 - 2) * $3) * bps ))
    [ "$(od -An -tu1 -j$((first + 11)) -N1 "$esp_dev" | tr -d ' ')" = 8 ] ||
        die "mkfs.vfat wrote no volume label entry where it was expected"
    # shellcheck disable=SC2046
    set -- $(date -u -d "@$SOURCE_DATE_EPOCH" '+%Y %m %d %H %M %S')
    d=$(( ($1 - 1980) * 512 + ${2#0} * 32 + ${3#0} ))
    t=$(( ${4#0} * 2048 + ${5#0} * 32 + ${6#0} / 2 ))
    tl=$((t % 256)) th=$((t / 256)) dl=$((d % 256)) dh=$((d / 256))
    # Bytes 13-25: creation time (10 ms, time, date), access date, cluster high (0),
    # modification time and date.
    fmt=
    for b in 0 "$tl" "$th" "$dl" "$dh" "$dl" "$dh" 0 0 "$tl" "$th" "$dl" "$dh"; do
        fmt="$fmt$(printf '\\%03o' "$b")"
    done
    # shellcheck disable=SC2059
    printf "$fmt" | dd of="$esp_dev" bs=1 seek=$((first + 13)) count=13 conv=notrunc \
        2>/dev/null
}

part() {  # partition N of the disk: vda1, loop0p1, nvme0n1p1
    case $dev in *[0-9]) echo "${dev}p$1" ;; *) echo "$dev$1" ;; esac
}

# ---------------------------------------------------------------- partitions
# The ESP is prefilled when the host gave its id.
esp_made=${prefilled:+$esp_id}
hash_seed=
disk_guid=
esp_guid=
if [ -n "$repro" ] && [ -z "$prefilled" ]; then
    derive_ids
    [ -n "$root_uuid" ] || root_uuid=$id_root_fs
    [ -n "$esp_id" ] || esp_id=$hex_esp_fs
    if [ "$table" = gpt ]; then
        [ -n "$root_partuuid" ] || root_partuuid=$id_root_part
    else
        [ -n "$root_partuuid" ] || root_partuuid=$hex_disk-01
    fi
    hash_seed=$id_hash_seed
    disk_guid=$id_disk
    esp_guid=$id_esp_part
fi
if [ -n "$esp_id" ]; then esp_id=$(echo "$esp_id" | tr a-f A-F); else esp_id=$(hex8 | tr a-f A-F); fi
touched=1
if [ "$table" = gpt ]; then
    esp_dev=$(part 1)
    root_dev=$(part 2)
else
    esp_dev=
    root_dev=$(part 1)
fi
if [ -n "$prefilled" ]; then
    # The host wrote the table and the root. Their identifiers come with the options
    # (each program run costs time under TCG), else from the disk.
    step "using the partition table and root filesystem made on the host"
    if [ -z "$root_partuuid" ] && [ "$table" = gpt ]; then
        root_partuuid=$(sfdisk --part-uuid "$dev" 2 | tr A-F a-f)
    elif [ -z "$root_partuuid" ]; then
        disk_id=$(sfdisk --disk-id "$dev")
        root_partuuid=${disk_id#0x}-01
    fi
    [ -n "$root_partuuid" ] || die "--prefilled: $device has no $table partition table"
    [ -n "$root_uuid" ] || root_uuid=$(blkid -p -s UUID -o value "$root_dev") ||
        die "--prefilled: no filesystem on $root_dev"
elif [ "$table" = gpt ]; then
    step "partitioning $dev ($table)"
    [ -n "$root_uuid" ] || root_uuid=$(uuid)
    [ -n "$root_partuuid" ] || root_partuuid=$(uuid)
    # Root type: the architecture's "Linux root" of the Discoverable Partitions
    # Specification.
    sfdisk -q --wipe always "$dev" <<EOF
label: gpt
label-id: ${disk_guid:-$(uuid)}
size=$esp_size, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=${esp_guid:-$(uuid)}, name="esp"
type=$root_type, uuid=$root_partuuid, name="root"
EOF
else
    step "partitioning $dev ($table)"
    [ -n "$root_uuid" ] || root_uuid=$(uuid)
    [ -n "$root_partuuid" ] || root_partuuid=$(hex8)-01
    disk_id=${root_partuuid%-01}
    sfdisk -q --wipe always "$dev" <<EOF
label: dos
label-id: 0x$disk_id
type=83, bootable
EOF
fi

# devtmpfs makes the partition nodes when the kernel re-reads the table.
tries=0
until [ -b "$root_dev" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 50 ] || die "$root_dev did not appear after partitioning"
    sleep 0.1
done

# ---------------------------------------------------------------- the root tree
tar_opts=-p
if tar --version 2>/dev/null | grep -q GNU; then
    # Numeric ids (the guest has no passwd); file capabilities (ping) and ACLs kept.
    tar_opts="-p --numeric-owner --xattrs --xattrs-include=* --acls"
fi

unpack_into() {  # DIR: ROOT's tarball unpacked as root
    case $root_kind in
    tar)
        # shellcheck disable=SC2086
        if [ -n "$root_bytes" ]; then
            head -c "$root_bytes" "$root" | tar $tar_opts -xf - -C "$1" || return
        else
            tar $tar_opts -xf "$root" -C "$1" || return
        fi
        ;;
    *)
        # POSIX sh has no pipefail: the decompressor's failure is recorded in a file.
        rc_file=$work/unpack.rc
        if [ -n "$root_bytes" ]; then
            # shellcheck disable=SC2086
            { head -c "$root_bytes" "$root" | "$root_kind" -dc || echo $? >"$rc_file"; } |
                tar $tar_opts -xf - -C "$1" || return
        else
            # shellcheck disable=SC2086
            { "$root_kind" -dc <"$root" || echo $? >"$rc_file"; } |
                tar $tar_opts -xf - -C "$1" || return
        fi
        [ ! -s "$rc_file" ] || die "$root_kind could not decompress $root"
        ;;
    esac
}

# A reproducible ext4 root is written by mke2fs -d (userspace: the same bytes for the
# same tree), from ROOT's directory or from its tarball unpacked in memory, and made
# without a journal (added at the end, fresh): the kernel's writes depend on timing.
populate_repro() {
    src=$root
    if [ "$root_kind" != dir ]; then
        tree_mnt=$work/tree
        mkdir "$tree_mnt"
        avail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
        [ "$avail" -gt 96 ] || die "the guest has $avail MiB free, too little to unpack ROOT in (a reproducible image's tree is unpacked there first): give helper-run more --memory"
        mount -t tmpfs -o "size=$((avail - 48))m,mode=0755" hshelper-tree "$tree_mnt"
        unpack_into "$tree_mnt" || die "unpacking ROOT into the guest's memory failed (a reproducible image's tree is unpacked there first: $avail MiB were free; give helper-run more --memory)"
        src=$tree_mnt
        step "unpacked in memory; mke2fs -d"
    fi
    # shellcheck disable=SC2086
    mke2fs -q -F -t ext4 -O "^has_journal${ext4_features:+,$ext4_features}" -L "$label" \
        -U "$root_uuid" -E "hash_seed=$hash_seed,lazy_itable_init=0" -d "$src" "$root_dev"
    # mke2fs copies each entry's change and access times from the tree, which has the
    # times of its own making: the build's time instead, for every entry; modification
    # times later than it (a directory the tarball has no member for) clamped to it.
    if [ -n "$(cd "$src" && find . -name "*$nl*" | head -n 1)" ]; then
        die "ROOT has a name with a newline, which the reproducible build cannot stamp"
    fi
    touch -t "$(date -u -d "@$epoch" '+%Y%m%d%H%M.%S')" "$work/epoch"
    {
        (cd "$src" && find .) | awk -v e="$epoch" '{
            p = substr($0, 2); if (p == "") p = "/"; gsub(/"/, "\"\"", p)
            printf "sif \"%s\" ctime @%s\nsif \"%s\" atime @%s\n", p, e, p, e }'
        (cd "$src" && find . -newer "$work/epoch") | awk -v e="$epoch" '{
            p = substr($0, 2); if (p == "") p = "/"; gsub(/"/, "\"\"", p)
            printf "sif \"%s\" mtime @%s\n", p, e }'
    } >"$work/stamp.cmds"
    step "dating the root's entries"
    debugfs_script "$work/stamp.cmds"
    if [ -n "$tree_mnt" ]; then
        umount "$tree_mnt"
        tree_mnt=
    fi
}

debugfs_script() {  # FILE: run by debugfs -w on the root, which reports failures only on stderr
    debugfs -w -f "$1" "$root_dev" >/dev/null 2>"$work/debugfs.err" ||
        die "debugfs failed: $(head -n 3 "$work/debugfs.err")"
    if grep -v '^debugfs ' "$work/debugfs.err" | grep -q .; then
        die "debugfs failed: $(grep -v '^debugfs ' "$work/debugfs.err" | head -n 3)"
    fi
}

# ---------------------------------------------------------------- filesystems
step "making the filesystems"
if [ -n "$esp_dev" ] && [ -z "$esp_made" ]; then
    if [ -n "$repro" ]; then
        # --invariant first: it sets a volume id of its own, which -i then replaces.
        mkfs.vfat --invariant -F 32 -n ESP -i "$esp_id" "$esp_dev" >/dev/null
        fat_stamp_label "$esp_dev"
    else
        mkfs.vfat -F 32 -n ESP -i "$esp_id" "$esp_dev" >/dev/null
    fi
fi
ext4_features=
# extlinux (syslinux 6.04) reads ext4 only without the 64bit feature.
[ "$bootloader" != extlinux ] || ext4_features="^64bit"
case $root_kind-$fs in
prefilled-*) ;;
*-ext4)
    if [ -n "$repro" ]; then
        step "filling the ext4 root from $root ($root_kind) with mke2fs -d"
        populate_repro
    else
        mkfs.ext4 -q -F -L "$label" -U "$root_uuid" ${ext4_features:+-O "$ext4_features"} \
            "$root_dev"
    fi
    ;;
*-xfs) mkfs.xfs -q -f -L "$label" -m uuid="$root_uuid" "$root_dev" ;;
*-btrfs) mkfs.btrfs -q -f -L "$label" -U "$root_uuid" "$root_dev" >/dev/null ;;
esac

mkdir -p "$mnt"
if [ -n "$repro" ]; then
    # No access times; blocks allocated as each file is written, in the recipe's order.
    mount -t ext4 -o noatime,nodelalloc "$root_dev" "$mnt"
else
    mount -t "$fs" "$root_dev" "$mnt"
fi

if [ -z "$repro" ] && [ -z "$prefilled" ]; then
    step "filling the $fs root from $root ($root_kind)"
    if [ "$root_kind" = dir ]; then
        cp -a "$root/." "$mnt/"
    else
        unpack_into "$mnt"
    fi
fi
[ -d "$mnt/etc" ] || die "ROOT $root has no /etc: not a root filesystem"

# What the recipe changes in the root, by path: a reproducible image's inodes are
# dated and stripped of the kernel's random generation numbers after the unmount.
made() { for p; do echo "$p" >>"$work/touched"; done; }
root_file() {  # PATH: about to be written (its directory changes too when it is new)
    if [ ! -e "$mnt$1" ]; then
        d=${1%/*}
        made "${d:-/}"
    fi
    made "$1"
}
make_dir() {  # DIR: mkdir -p in the new root
    d=$1
    while [ ! -d "$mnt$d" ]; do
        made "$d"
        d=${d%/*}
    done
    [ "$d" = "$1" ] || made "${d:-/}"
    mkdir -p "$mnt$1"
}

# ---------------------------------------------------------------- kernel
find_kernel() {
    if [ -n "$kernel" ]; then
        echo "$kernel"
    elif [ -L "$mnt/vmlinuz" ]; then
        target=$(readlink "$mnt/vmlinuz")
        echo "${target##*vmlinuz-}"
    else
        last=
        for k in "$mnt"/boot/vmlinuz-*; do [ -f "$k" ] && last=${k##*/vmlinuz-}; done
        echo "$last"
    fi
}
kver=$(find_kernel)
kernel_file=
initrd_file=
if [ "$bootloader" != none ]; then
    [ -n "$kver" ] || die "ROOT has no kernel in /boot (install one, or use --bootloader none)"
    kernel_file=/boot/vmlinuz-$kver
    [ -f "$mnt$kernel_file" ] || die "ROOT has no $kernel_file"
    for i in "/boot/initrd.img-$kver" "/boot/initramfs-$kver.img"; do
        if [ -f "$mnt$i" ]; then initrd_file=$i; break; fi
    done
    [ -n "$initrd_file" ] || say "warning: no initrd for $kver in ROOT; booting without one"
fi
cmdline="root=PARTUUID=$root_partuuid rootfstype=$fs rw${console:+ $console}${append:+ $append}"

# ---------------------------------------------------------------- fstab
root_file /etc/fstab
{
    echo "# written by hshelper's mkimage.sh"
    echo "UUID=$root_uuid / $fs defaults 0 1"
    if [ -n "$esp_dev" ]; then
        echo "UUID=$(echo "$esp_id" | cut -c1-4)-$(echo "$esp_id" | cut -c5-8) /boot/efi vfat umask=0077 0 2"
    fi
} >"$mnt/etc/fstab"

# ---------------------------------------------------------------- bootloader
sd_boot=/usr/lib/systemd/boot/efi/systemd-boot$efi.efi
grub_efi=/usr/lib/grub/$grub_dir/monolithic/grub$efi.efi
case $bootloader in systemd-boot | grub | efi-auto)
    [ -n "$efi" ] || die "$arch has no UEFI boot here: use --bootloader none (or extlinux)" ;;
esac
if [ "$bootloader" = efi-auto ]; then
    if [ -f "$mnt$sd_boot" ]; then
        bootloader=systemd-boot
    elif [ -f "$mnt$grub_efi" ]; then
        bootloader=grub
    else
        die "ROOT has no UEFI bootloader: install systemd-boot-efi or $grub_pkg in it (or --bootloader none)"
    fi
fi

# The ESP: mounted, or (reproducible) written by mtools, which dates what it writes by
# SOURCE_DATE_EPOCH where the kernel would use its clock.
if [ -n "$esp_dev" ] && [ "$bootloader" != none ]; then
    make_dir /boot/efi
    if [ -z "$repro" ]; then
        esp_mnt=$mnt/boot/efi
        mount -t vfat "$esp_dev" "$esp_mnt"
    fi
fi
esp_dirs() {  # DIR...: made on the ESP, parents first (one program run: TCG)
    if [ -n "$esp_mnt" ]; then
        for d; do set -- "$@" "$esp_mnt$d"; shift; done
        mkdir -p "$@"
    else
        for d; do set -- "$@" "::$d"; shift; done
        # mtools warns about the partition's hidden sectors: shown only on failure.
        mmd -i "$esp_dev" -D s "$@" 2>"$work/mtools.err" ||
            die "mmd failed: $(grep -v '^Hidden' "$work/mtools.err" | head -n 3)"
    fi
}
# A file written on the ESP: into "$target" (the mounted ESP's file, or a file to copy
# over with mtools), then esp_commit DEST.
esp_target() {
    if [ -n "$esp_mnt" ]; then target=$esp_mnt$1; else target=$work/esp.file; fi
}
esp_commit() {
    [ -n "$esp_mnt" ] || esp_put "$target" "$1"
}
esp_put() {  # FILE DEST: a file copied onto the ESP
    if [ -n "$esp_mnt" ]; then
        cp "$1" "$esp_mnt$2"
    else
        mcopy -i "$esp_dev" -D o "$1" "::$2" 2>"$work/mtools.err" ||
            die "mcopy $2 failed: $(grep -v '^Hidden' "$work/mtools.err" | head -n 3)"
    fi
}

install_systemd_boot() {
    [ -f "$mnt$sd_boot" ] || die "ROOT has no $sd_boot (install systemd-boot-efi in it)"
    esp_dirs /EFI /EFI/BOOT /EFI/systemd /loader /loader/entries "/$kver"
    esp_put "$mnt$sd_boot" "/EFI/BOOT/$EFI_BOOT"
    esp_put "$mnt$sd_boot" "/EFI/systemd/systemd-boot$efi.efi"
    # systemd-boot reads only the ESP: kernel and initrd go there.
    esp_put "$mnt$kernel_file" "/$kver/linux"
    [ -z "$initrd_file" ] || esp_put "$mnt$initrd_file" "/$kver/initrd"
    esp_target /loader/loader.conf
    printf 'default linux.conf\ntimeout 0\neditor no\n' >"$target"
    esp_commit /loader/loader.conf
    esp_target /loader/entries/linux.conf
    {
        echo "title Linux $kver"
        echo "linux /$kver/linux"
        [ -z "$initrd_file" ] || echo "initrd /$kver/initrd"
        echo "options $cmdline"
    } >"$target"
    esp_commit /loader/entries/linux.conf
}

install_grub() {
    [ -f "$mnt$grub_efi" ] || die "ROOT has no $grub_efi (install $grub_pkg in it)"
    esp_dirs /EFI /EFI/BOOT /EFI/debian
    make_dir /boot/grub
    # Debian's monolithic image has every module built in; its embedded config reads
    # grub.cfg from its own directory or from /EFI/debian on the ESP.
    esp_put "$mnt$grub_efi" "/EFI/BOOT/$EFI_BOOT"
    root_file /boot/grub/grub.cfg
    {
        echo "set timeout=0"
        echo "set default=0"
        echo "search --no-floppy --fs-uuid --set=root $root_uuid"
        echo "menuentry 'Linux $kver' {"
        echo "    linux $kernel_file $cmdline"
        [ -z "$initrd_file" ] || echo "    initrd $initrd_file"
        echo "}"
    } >"$mnt/boot/grub/grub.cfg"
    esp_put "$mnt/boot/grub/grub.cfg" /EFI/BOOT/grub.cfg
    esp_put "$mnt/boot/grub/grub.cfg" /EFI/debian/grub.cfg
}

install_extlinux() {
    # extlinux.conf is also what U-Boot's distro boot reads on boards.
    make_dir /boot/extlinux
    root_file /boot/extlinux/extlinux.conf
    {
        echo "DEFAULT linux"
        echo "PROMPT 0"
        echo "TIMEOUT 1"
        echo "LABEL linux"
        echo "    LINUX $kernel_file"
        [ -z "$initrd_file" ] || echo "    INITRD $initrd_file"
        echo "    APPEND $cmdline"
    } >"$mnt/boot/extlinux/extlinux.conf"
    mbr=$mnt/usr/lib/syslinux/mbr/mbr.bin
    if [ -x "$mnt/usr/bin/extlinux" ] && [ -f "$mbr" ]; then
        root_file /boot/extlinux/ldlinux.sys
        root_file /boot/extlinux/ldlinux.c32
        # The root's own extlinux, chrooted: it finds the disk through /proc and /dev.
        for m in dev proc sys; do mount -o bind "/$m" "$mnt/$m"; done
        chroot "$mnt" /usr/bin/extlinux --install /boot/extlinux >/dev/null 2>"$work/extlinux.err" ||
            die "extlinux --install failed: $(head -n 3 "$work/extlinux.err")"
        for m in dev proc sys; do umount "$mnt/$m"; done
        dd if="$mbr" of="$dev" bs=440 count=1 conv=notrunc 2>/dev/null
    else
        say "ROOT has no extlinux (install extlinux and syslinux-common in it for legacy BIOS boot); wrote only extlinux.conf for U-Boot"
    fi
}

step "installing the bootloader: $bootloader"
case $bootloader in
systemd-boot) install_systemd_boot ;;
grub) install_grub ;;
extlinux) install_extlinux ;;
none) ;;
esac

# ---------------------------------------------------------------- finish
# After the unmount, what the kernel wrote on its own: the changed inodes' times,
# random generation numbers and change counters; the mount time, count and path; then
# the checksums of directories whose generation changed (e2fsck), and a fresh journal.
settle_ext4() {
    if [ -s "$work/touched" ]; then
        # Generations last and deepest first: a directory whose generation changed
        # fails its checksums (e2fsck mends them), so debugfs cannot look through it.
        sort -u "$work/touched" | awk -v e="$epoch" '{
            q = $0; gsub(/"/, "\"\"", q); q = "\"" q "\""; path[NR] = q
            depth[NR] = gsub(/\//, "/", q)
            n = split("atime mtime ctime crtime", f, " ")
            for (i = 1; i <= n; i++) printf "sif %s %s @%s\nsif %s %s_extra 0\n", path[NR], f[i], e, path[NR], f[i]
            printf "sif %s version 0\n", path[NR] }
            END { for (d = 64; d >= 0; d--) for (i = 1; i <= NR; i++)
                if (depth[i] == d) printf "sif %s generation 0\n", path[i] }' >"$work/settle.cmds"
        debugfs_script "$work/settle.cmds"
    fi
    e2fsck -fy "$root_dev" >"$work/e2fsck.out" 2>&1 || [ "$?" -eq 1 ] ||
        die "e2fsck found the root damaged: $(tail -n 3 "$work/e2fsck.out")"
    # s_last_mounted (64 bytes at 136 in the superblock): the random mount point's path;
    # debugfs would end it with a NUL only, so zeros first. debugfs then writes the
    # superblock's checksum.
    dd if=/dev/zero of="$root_dev" bs=8 seek=145 count=8 conv=notrunc 2>/dev/null
    printf '%s\n' "ssv mtime @$epoch" "ssv lastcheck @$epoch" "ssv mnt_count 0" \
        "ssv kbytes_written 0" >"$work/super.cmds"
    debugfs_script "$work/super.cmds"
    # Every superblock copy is written from the one just set.
    tune2fs -j "$root_dev" >/dev/null
}

step "unmounting and syncing"
[ -z "$esp_mnt" ] || umount "$esp_mnt"
esp_mnt=
umount "$mnt"
if [ -n "$repro" ]; then
    step "settling the root for a reproducible image"
    settle_ext4
fi
sync

[ -z "$want_sha$qcow2" ] || step "checksums and copies"
if [ -n "$want_sha" ]; then
    # The checksum of the device is the checksum of OUTPUT (same bytes).
    echo "$(sha256sum <"$dev" | cut -d' ' -f1)  ${output##*/}" >"$output.sha256.part"
fi
if [ -n "$qcow2" ]; then
    qemu-img convert -f raw -O qcow2 "$dev" "$qcow2.part"
    if [ -n "$want_sha" ]; then
        echo "$(sha256sum <"$qcow2.part" | cut -d' ' -f1)  ${qcow2##*/}" >"$qcow2.sha256.part"
    fi
fi
# Everything succeeded: only now do the final names appear.
if [ -n "$qcow2" ]; then
    mv -f "$qcow2.part" "$qcow2"
    [ -z "$want_sha" ] || mv -f "$qcow2.sha256.part" "$qcow2.sha256"
fi
if [ -n "$output" ]; then
    [ -z "$want_sha" ] || mv -f "$output.sha256.part" "$output.sha256"
    mv -f "$part_file" "$output"
fi
finished=1
step "done: ${output:-$device} ($table, $fs root, bootloader $bootloader${kver:+, kernel $kver}${repro:+, reproducible: seed $seed, SOURCE_DATE_EPOCH $epoch})"

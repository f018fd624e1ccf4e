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
  --console WORDS      console words of the command line
                       (default: "console=tty0 console=ttyS0,115200"; "" for none)
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
  -h, --help           show this help

The root filesystem's /etc/fstab is replaced (root and ESP by UUID); the kernel finds
the root by PARTUUID. Exit status: 0 done, 1 a step failed, 2 bad usage.
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
console="console=tty0 console=ttyS0,115200"
qcow2=
want_sha=
size=
prefilled=
root_uuid=
root_partuuid=
esp_id=
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
    --append) need_arg "$@"; append="${append:+$append }$2"; shift ;;
    --console) need_arg "$@"; console=$2; shift ;;
    --qcow2) need_arg "$@"; qcow2=$2; shift ;;
    --sha256) want_sha=1 ;;
    --size) need_arg "$@"; size=$2; shift ;;
    --prefilled) prefilled=1 ;;
    --root-uuid) need_arg "$@"; root_uuid=$2; shift ;;
    --root-partuuid) need_arg "$@"; root_partuuid=$2; shift ;;
    --esp-id) need_arg "$@"; esp_id=$2; shift ;;
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

# ---------------------------------------------------------------- input checks
# Everything is checked before the disk is touched.
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

part_file=
if [ -n "$output" ]; then
    part_file=$output.part
    [ -f "$part_file" ] ||
        die "OUTPUT is built on $part_file, which does not exist: attach the disk with --disk $part_file,size=SIZE,name=out"
    # The disk must really be that file: compare sizes (the guest cannot see the
    # disk's backing file, and a mismatch means the wrong --disk).
    part_bytes=$(stat -c %s "$part_file")
    [ "$part_bytes" -eq "$dev_bytes" ] ||
        die "$device ($dev_bytes bytes) is not $part_file ($part_bytes bytes): attach $part_file as the disk"
    [ ! -d "$output" ] || die "OUTPUT $output is a directory"
fi

# ---------------------------------------------------------------- cleanup
work=$(mktemp -d /tmp/mkimage.XXXXXX)
mnt=$work/root
esp_mnt=
touched=
finished=
cleanup() {
    status=$?
    set +e
    [ -n "$esp_mnt" ] && umount "$esp_mnt" 2>/dev/null
    for m in "$mnt/dev" "$mnt/proc" "$mnt/sys"; do umount "$m" 2>/dev/null; done
    umount "$mnt" 2>/dev/null
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
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the input
# Checked once a failure can clean up after itself (the trap removes OUTPUT.part).
case $table in gpt | mbr) ;; *) usage_error "--table must be gpt or mbr" ;; esac
case $fs in ext4 | xfs | btrfs) ;; *) usage_error "--fs must be ext4, xfs or btrfs" ;; esac
case $esp_size in
'' | *[!0-9A-Za-z]*) usage_error "--esp-size: a size like 256MiB, 100M or 1G" ;;
esac
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
case $bootloader in
auto) if [ "$table" = gpt ]; then bootloader=efi-auto; else bootloader=extlinux; fi ;;
systemd-boot | grub) [ "$table" = gpt ] || usage_error "$bootloader needs --table gpt" ;;
extlinux | none) ;;
*) usage_error "--bootloader must be auto, systemd-boot, grub, extlinux or none" ;;
esac

if [ -n "$prefilled" ]; then
    [ "$fs" = ext4 ] || usage_error "--prefilled: the prefilled root is ext4 (not --fs $fs)"
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
    if [ -b "$root" ] && [ "$root_kind" != tar ]; then
        # A disk is padded to whole sectors, which compressed streams reject: read the
        # file's own bytes only, which hshelper gives for its disks.
        case $root in
        /dev/disk/hshelper/*)
            var=HSHELPER_DISK_$(echo "${root##*/}" | tr 'a-z-' 'A-Z_')_BYTES
            eval "root_bytes=\${$var:-}"
            ;;
        esac
        [ -n "$root_bytes" ] ||
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
    [ -n "$output" ] || usage_error "--sha256 needs OUTPUT (the checksum names the file)"
    command -v sha256sum >/dev/null || die "sha256sum is not in the helper image"
fi

# ---------------------------------------------------------------- partitions
uuid() { cat /proc/sys/kernel/random/uuid; }
hex8() { uuid | tr -d '-' | cut -c1-8; }

part() {  # partition N of the disk: vda1, loop0p1, nvme0n1p1
    case $dev in *[0-9]) echo "${dev}p$1" ;; *) echo "$dev$1" ;; esac
}

# The ESP is prefilled when the host gave its id.
esp_made=${prefilled:+$esp_id}
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
    # Root type: "Linux root (x86-64)" of the Discoverable Partitions Specification.
    sfdisk -q --wipe always "$dev" <<EOF
label: gpt
label-id: $(uuid)
size=$esp_size, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$(uuid), name="esp"
type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_partuuid, name="root"
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

# ---------------------------------------------------------------- filesystems
step "making the filesystems"
if [ -n "$esp_dev" ] && [ -z "$esp_made" ]; then
    mkfs.vfat -F 32 -n ESP -i "$esp_id" "$esp_dev" >/dev/null
fi
case $root_kind-$fs in
prefilled-*) ;;
*-ext4)
    ext4_opts=
    # extlinux (syslinux 6.04) reads ext4 only without the 64bit feature.
    [ "$bootloader" = extlinux ] && ext4_opts="-O ^64bit"
    # shellcheck disable=SC2086
    mkfs.ext4 -q -F -L "$label" -U "$root_uuid" $ext4_opts "$root_dev"
    ;;
*-xfs) mkfs.xfs -q -f -L "$label" -m uuid="$root_uuid" "$root_dev" ;;
*-btrfs) mkfs.btrfs -q -f -L "$label" -U "$root_uuid" "$root_dev" >/dev/null ;;
esac

mkdir -p "$mnt"
mount -t "$fs" "$root_dev" "$mnt"

# ---------------------------------------------------------------- the root tree
tar_opts=-p
if tar --version 2>/dev/null | grep -q GNU; then
    # Numeric ids (the guest has no passwd); file capabilities (ping) and ACLs kept.
    tar_opts="-p --numeric-owner --xattrs --xattrs-include=* --acls"
fi
[ -n "$prefilled" ] || step "filling the $fs root from $root ($root_kind)"
case $root_kind in
prefilled) ;;
dir) cp -a "$root/." "$mnt/" ;;
tar)
    # shellcheck disable=SC2086
    tar $tar_opts -xf "$root" -C "$mnt"
    ;;
*)
    # POSIX sh has no pipefail: the decompressor's failure is recorded in a file.
    rc_file=$work/unpack.rc
    if [ -n "$root_bytes" ]; then
        # shellcheck disable=SC2086
        { head -c "$root_bytes" "$root" | "$root_kind" -dc || echo $? >"$rc_file"; } |
            tar $tar_opts -xf - -C "$mnt"
    else
        # shellcheck disable=SC2086
        { "$root_kind" -dc <"$root" || echo $? >"$rc_file"; } | tar $tar_opts -xf - -C "$mnt"
    fi
    [ ! -s "$rc_file" ] || die "$root_kind could not decompress $root"
    ;;
esac
[ -d "$mnt/etc" ] || die "ROOT $root has no /etc: not a root filesystem"

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
{
    echo "# written by hshelper's mkimage.sh"
    echo "UUID=$root_uuid / $fs defaults 0 1"
    if [ -n "$esp_dev" ]; then
        echo "UUID=$(echo "$esp_id" | cut -c1-4)-$(echo "$esp_id" | cut -c5-8) /boot/efi vfat umask=0077 0 2"
    fi
} >"$mnt/etc/fstab"

# ---------------------------------------------------------------- bootloader
sd_boot=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
grub_efi=/usr/lib/grub/x86_64-efi/monolithic/grubx64.efi
if [ "$bootloader" = efi-auto ]; then
    if [ -f "$mnt$sd_boot" ]; then
        bootloader=systemd-boot
    elif [ -f "$mnt$grub_efi" ]; then
        bootloader=grub
    else
        die "ROOT has no UEFI bootloader: install systemd-boot-efi or grub-efi-amd64-bin in it (or --bootloader none)"
    fi
fi

if [ -n "$esp_dev" ] && [ "$bootloader" != none ]; then
    esp_mnt=$mnt/boot/efi
    mkdir -p "$esp_mnt"
    mount -t vfat "$esp_dev" "$esp_mnt"
fi

install_systemd_boot() {
    [ -f "$mnt$sd_boot" ] || die "ROOT has no $sd_boot (install systemd-boot-efi in it)"
    mkdir -p "$esp_mnt/EFI/BOOT" "$esp_mnt/EFI/systemd" "$esp_mnt/loader/entries" \
        "$esp_mnt/$kver"
    cp "$mnt$sd_boot" "$esp_mnt/EFI/BOOT/BOOTX64.EFI"
    cp "$mnt$sd_boot" "$esp_mnt/EFI/systemd/systemd-bootx64.efi"
    # systemd-boot reads only the ESP: kernel and initrd go there.
    cp "$mnt$kernel_file" "$esp_mnt/$kver/linux"
    [ -z "$initrd_file" ] || cp "$mnt$initrd_file" "$esp_mnt/$kver/initrd"
    printf 'default linux.conf\ntimeout 0\neditor no\n' >"$esp_mnt/loader/loader.conf"
    {
        echo "title Linux $kver"
        echo "linux /$kver/linux"
        [ -z "$initrd_file" ] || echo "initrd /$kver/initrd"
        echo "options $cmdline"
    } >"$esp_mnt/loader/entries/linux.conf"
}

install_grub() {
    [ -f "$mnt$grub_efi" ] || die "ROOT has no $grub_efi (install grub-efi-amd64-bin in it)"
    mkdir -p "$esp_mnt/EFI/BOOT" "$esp_mnt/EFI/debian" "$mnt/boot/grub"
    # Debian's monolithic image has every module built in; its embedded config reads
    # grub.cfg from its own directory or from /EFI/debian on the ESP.
    cp "$mnt$grub_efi" "$esp_mnt/EFI/BOOT/BOOTX64.EFI"
    {
        echo "set timeout=0"
        echo "set default=0"
        echo "search --no-floppy --fs-uuid --set=root $root_uuid"
        echo "menuentry 'Linux $kver' {"
        echo "    linux $kernel_file $cmdline"
        [ -z "$initrd_file" ] || echo "    initrd $initrd_file"
        echo "}"
    } >"$mnt/boot/grub/grub.cfg"
    cp "$mnt/boot/grub/grub.cfg" "$esp_mnt/EFI/BOOT/grub.cfg"
    cp "$mnt/boot/grub/grub.cfg" "$esp_mnt/EFI/debian/grub.cfg"
}

install_extlinux() {
    # extlinux.conf is also what U-Boot's distro boot reads on boards.
    mkdir -p "$mnt/boot/extlinux"
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
        # The root's own extlinux, chrooted: it finds the disk through /proc and /dev.
        for m in dev proc sys; do mount -o bind "/$m" "$mnt/$m"; done
        chroot "$mnt" /usr/bin/extlinux --install /boot/extlinux >/dev/null
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
step "unmounting and syncing"
[ -z "$esp_mnt" ] || umount "$esp_mnt"
esp_mnt=
umount "$mnt"
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
step "done: ${output:-$device} ($table, $fs root, bootloader $bootloader${kver:+, kernel $kver})"

"""Disk images attached as virtio block devices, with stable names in the guest.

``--disk PATH[,size=SIZE][,format=raw|qcow2][,name=NAME][,ro]``: a missing image is
created (sparse raw, or qcow2 with qemu-img) when a size is given. In the guest the disk
is ``/dev/disk/hshelper/NAME`` (made without udev from the virtio serial number) and its
device path is in ``$HSHELPER_DISK_NAME`` (NAME upper-cased, '-' as '_'), and for a raw
image the file's own size in ``$HSHELPER_DISK_NAME_BYTES`` (the disk is padded to whole
sectors: a compressed tarball attached as a disk is read with ``head -c``). Partitions
appear as soon as sfdisk or parted re-read the table (devtmpfs makes the nodes).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from hshelper import runner
from hshelper.errors import HshelperError
from hshelper.guestrun import quote
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Disk
from hshelper.qemu import savedstate
from hshelper.sizes import parse_size


def parse_disk(text: str, index: int) -> Disk:
    path, *opts = text.split(",")
    if not path:
        raise HshelperError(f"--disk {text!r}: no path", status=2)
    values: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key == "ro" and not sep:
            values["ro"] = "1"
        elif key in ("size", "format", "name") and sep:
            values[key] = value
        else:
            raise HshelperError(f"--disk {text!r}: unknown option {opt!r} (size=, format=, "
                                "name=, ro)", status=2)
    fmt = values.get("format", "qcow2" if path.endswith(".qcow2") else "raw")
    if fmt not in ("raw", "qcow2"):
        raise HshelperError(f"--disk {text!r}: format must be raw or qcow2", status=2)
    name = values.get("name", f"disk{index}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", name):
        raise HshelperError(f"--disk {text!r}: a name is 1-20 letters, digits, - or _",
                            status=2)
    size = None
    if "size" in values:
        try:
            size = parse_size(values["size"])  # bytes, unless K, M, G or T says otherwise
        except HshelperError as exc:
            raise HshelperError(f"--disk {text!r}: {exc}", status=2) from None
        if size < 1:
            raise HshelperError(f"--disk {text!r}: the size must be more than 0", status=2)
    return Disk(Path(path).absolute(), name, fmt, size, "ro" in values)


def env_name(disk: Disk) -> str:
    return "HSHELPER_DISK_" + disk.name.upper().replace("-", "_")


def ensure_disk(disk: Disk) -> None:
    """Create a missing image (sparse), or refuse with what to do."""
    if disk.path.exists():
        return
    if disk.size is None:
        raise HshelperError(f"disk image {disk.path} does not exist; give size=SIZE to "
                            "create it", status=2)
    if disk.format == "qcow2":
        runner.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk.path),
                    str(disk.size)], hint="install qemu-utils / qemu-img")
    else:
        with open(disk.path, "xb") as fh:
            fh.truncate(disk.size)


@hookimpl
def hshelper_add_arguments(parser, command):
    if command in ("run", "shell"):
        parser.add_argument("--disk", action="append", default=[],
                            metavar="PATH[,size=S][,format=F][,name=N][,ro]",
                            help="attach a disk image (created when missing and size= given)")


@hookimpl
def hshelper_image_contents():
    # Not loaded at boot: a run with disks loads it in its setup step (below).
    return Contents(modules=("virtio_blk",))


@hookimpl
def hshelper_run_spec(spec, args):
    texts = getattr(args, "disk", [])
    if not texts:
        return None
    disks = [parse_disk(t, i) for i, t in enumerate(texts)]
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise HshelperError("two --disk options have the same name", status=2)
    for disk in disks:
        ensure_disk(disk)
        if not os.access(disk.path, os.R_OK | (0 if disk.readonly else os.W_OK)):
            raise HshelperError(f"disk image {disk.path} is not "
                                f"{'readable' if disk.readonly else 'writable'} by "
                                f"uid {os.getuid()}")
    return dataclasses.replace(spec, disks=spec.disks + tuple(disks))


def slotted(spec) -> list[Disk]:
    """The disks qemu gets: the run's, and for a saved machine's shape placeholders in
    the slots left (never bound in the guest)."""
    disks = list(spec.disks)
    if spec.slot_dir:
        filler = Path(spec.slot_dir) / "placeholder.img"
        disks += [Disk(filler, f"unused{i}", "raw", None, True)
                  for i in range(len(disks), savedstate.DISK_SLOTS)]
    return disks


@hookimpl
def hshelper_qemu_args(spec, machine):
    args = []
    for i, disk in enumerate(slotted(spec)):
        drive_id = disk.drive_id(i)
        # werror=stop: a failed write (the host's disk full) pauses the VM and qemu says
        # so on its control channel, where the core ends the run with the host file
        # named. qemu's default (enospc) pauses too, but silently for a build farm; the
        # guest seeing EIO (report) could lose the error in its page cache and exit 0.
        drive = (f"file={disk.path},if=none,id={drive_id},format={disk.format},"
                 "discard=unmap,werror=stop,rerror=report")
        if disk.readonly:
            drive += ",readonly=on"
        address, _ = machine.slot(i)
        args += ["-drive", drive,
                 "-device", f"{machine.device('virtio-blk')},drive={drive_id},"
                            f"serial={disk.name},{address}"]
    return args


def _bytes(disk: Disk) -> str:
    """`` NAME_BYTES=N``: a raw image's size in bytes, as the host sees it now."""
    if disk.format != "raw":
        return ""
    try:
        return f" {env_name(disk)}_BYTES={disk.path.stat().st_size}"
    except OSError:
        return ""


@hookimpl
def hshelper_guest_setup(spec, machine):
    if not spec.disks:
        return []
    # The driver binds only this run's disks, in order, by their fixed slots: a saved
    # machine has placeholder slots too, and they must never become block devices.
    binds = "".join(
        f'for hsh_v in {machine.slot(i)[1]}; do\n'
        f'  [ -e "$hsh_v" ] && echo "${{hsh_v##*/}}" >/sys/bus/virtio/drivers/virtio_blk/bind\n'
        "done\n" for i in range(len(spec.disks)))
    # Shell only (no udev, no readlink): match each vdX's serial to a disk name.
    cases = "".join(
        f'    {d.name}) hsh_guest_env="$hsh_guest_env {env_name(d)}=$hsh_dev{_bytes(d)}" ;;\n'
        for d in spec.disks)
    code = ("echo 0 >/sys/bus/virtio/drivers_autoprobe\n"
            "hsh_load virtio_blk\n"  # probing is synchronous: vdX exist after a bind
            + binds +
            "echo 1 >/sys/bus/virtio/drivers_autoprobe\n"
            "mkdir -p /dev/disk/hshelper\n"
            "for hsh_b in /sys/block/vd*; do\n"
            '  [ -r "$hsh_b/serial" ] || continue\n'
            '  read -r hsh_s <"$hsh_b/serial"\n'
            '  hsh_dev=/dev/${hsh_b##*/}\n'
            '  ln -sf "$hsh_dev" "/dev/disk/hshelper/$hsh_s"\n'
            '  case $hsh_s in\n' + cases + "  esac\n"
            "done\n")
    for disk in spec.disks:
        link = quote(f"/dev/disk/hshelper/{disk.name}")
        code += (f"[ -e {link} ] || {{ echo 'hshelper: disk {disk.name} did not appear "
                 "in the guest' >&2; false; }\n")
    return [("disks", code)]

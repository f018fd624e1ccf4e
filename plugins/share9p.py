"""Share host directories with the guest over virtio-9p (no root needed on the host).

The working directory is always shared at its own absolute path, so relative paths in a
recipe mean the same in the guest; ``--share DIR[:GUESTDIR][:ro]`` adds more. Files the
guest creates belong to the user running qemu: the build user. QEMU's 9p server needs
/proc (it reopens files through /proc/self/fd): without it every create fails with a
confusing ENOENT, so a missing /proc is diagnosed before boot. No config keys.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hshelper.errors import HshelperError
from hshelper.guestrun import quote
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Share

MODULES = ("9p?", "9pnet_virtio?")


def parse_share(text: str) -> Share:
    """DIR[:GUESTDIR][:ro] -> Share (GUESTDIR defaults to DIR's absolute path)."""
    parts = text.split(":")
    readonly = parts[-1] == "ro"
    if readonly or parts[-1] == "rw":
        parts = parts[:-1]
    if not parts or not parts[0] or len(parts) > 2:
        raise HshelperError(f"--share {text!r}: expected DIR[:GUESTDIR][:ro]", status=2)
    host = Path(parts[0]).resolve()
    if not host.is_dir():
        raise HshelperError(f"--share {text!r}: {host} is not a directory", status=2)
    guest = parts[1] if len(parts) == 2 else str(host)
    if not guest.startswith("/"):
        raise HshelperError(f"--share {text!r}: the guest path must be absolute", status=2)
    return Share(host, guest, readonly)


def needs_proc_hint() -> str:
    return ("mount /proc in the build root: hasher: hsh-run --mountpoints=/proc (and "
            "allowed_mountpoints=/proc in hasher-priv's config); mock: it is mounted "
            "by default; a plain chroot: mount -t proc proc ROOT/proc")


@hookimpl
def hshelper_add_arguments(parser, command):
    if command in ("run", "shell"):
        # Checked as it is parsed: a bad --share is a usage error before the disks
        # plugin creates a missing --disk image.
        parser.add_argument("--share", action="append", default=[], type=parse_share,
                            metavar="DIR[:GUEST][:ro]",
                            help="share another host directory with the guest")
        parser.add_argument("--no-share-cwd", action="store_true",
                            help="do not share the working directory")


@hookimpl
def hshelper_image_contents():
    return Contents(modules=MODULES)


@hookimpl
def hshelper_run_spec(spec, args):
    shares = list(spec.shares)
    if not getattr(args, "no_share_cwd", False) and spec.cwd != "/":
        shares.insert(0, Share(Path(spec.cwd), spec.cwd))
    shares += getattr(args, "share", [])
    tagged = tuple(dataclasses.replace(s, tag=f"hsh{i}") for i, s in enumerate(shares))
    return dataclasses.replace(spec, shares=tagged)


@hookimpl
def hshelper_qemu_args(spec, image):
    if not spec.shares:
        return []
    if not {"9p", "9pnet_virtio"} <= image.features:
        raise HshelperError(
            f"kernel {image.kernel_version} has no 9p support (Debian's cloud kernel has "
            "none), so the working directory cannot be shared",
            hint="install a kernel with 9p modules (Debian: linux-image-amd64), or run "
                 "with --no-share-cwd and pass data on --disk images")
    if not os.path.isdir("/proc/self/fd"):
        raise HshelperError("/proc is not mounted here, and QEMU's 9p share needs it "
                            "(every file create in the share would fail with ENOENT)",
                            hint=needs_proc_hint())
    args = []
    for share in spec.shares:
        fsdev = f"local,id={share.tag},path={share.host},security_model=none"
        if share.readonly:
            fsdev += ",readonly=on"
        args += ["-fsdev", fsdev,
                 "-device", f"virtio-9p-pci,fsdev={share.tag},mount_tag={share.tag}"]
    return args


@hookimpl
def hshelper_guest_setup(spec):
    lines = []
    for share in spec.shares:
        opts = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"
        if share.readonly:
            opts += ",ro"
        lines.append(f"mkdir -p {quote(share.guest)} && "
                     f"$hsh_mount -t 9p -o {opts} {share.tag} {quote(share.guest)}")
    return [("share9p", "\n".join(lines))] if lines else []

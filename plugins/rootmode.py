"""``--mode root``: the build root itself, read-only, is the command's filesystem.

The way ALT's vm-run works: instead of the programs copied into the helper image, every
tool installed in the build root is there. The root is shared over 9p (read-only) at
/hshelper/root; the guest gives it its own /dev, /proc, /sys, a tmpfs /tmp and /run, and
binds the other shares (the working directory) into it; the command then runs chrooted
there. Needs the share9p plugin (and a kernel with 9p). Config: run.mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hshelper.errors import HshelperError
from hshelper.guestrun import quote
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Program, Share

GUEST_ROOT = "/hshelper/root"


def _root_mode(spec) -> bool:
    return spec.extra.get("mode") == "root"


@hookimpl
def hshelper_image_contents():
    return Contents(programs=(Program("chroot"),))


@hookimpl
def hshelper_run_spec(spec, config, args):
    if config.get("run", "mode") != "root":
        return None
    root = Path(getattr(args, "sysroot", None) or "/").resolve()
    share = Share(root, GUEST_ROOT, readonly=True, tag="hshroot")
    return dataclasses.replace(spec, shares=spec.shares + (share,),
                               extra={**spec.extra, "mode": "root"})


@hookimpl
def hshelper_qemu_args(spec, image):
    if _root_mode(spec) and not {"9p", "9pnet_virtio"} <= image.features:
        raise HshelperError(f"--mode root shares the build root over 9p, and kernel "
                            f"{image.kernel_version} has no 9p",
                            hint="use the default --mode image, or a kernel with 9p modules")
    return []


@hookimpl
def hshelper_guest_setup(spec):
    if not _root_mode(spec):
        return []
    r = quote(GUEST_ROOT)
    lines = [f"for hsh_d in /dev /proc /sys; do $hsh_mount -o bind $hsh_d {r}$hsh_d; done",
             f"$hsh_mount -t tmpfs -o mode=1777 tmpfs {r}/tmp",
             f"[ -d {r}/run ] && $hsh_mount -t tmpfs tmpfs {r}/run",
             f"[ -d {r}/dev/pts ] && $hsh_mount -o bind /dev/pts {r}/dev/pts"]
    for share in spec.shares:
        if share.guest != GUEST_ROOT:
            target = quote(GUEST_ROOT + share.guest)
            lines.append(f"[ -d {target} ] && $hsh_mount -o bind {quote(share.guest)} {target}")
    lines.append(f"hsh_chroot={r}")
    return [("rootmode", "\n".join(lines))]

"""The command's filesystem: the helper image over the whole build root.

Scripts expect every tool installed in the build root, with its own semantics; the
image carries only what boots the VM and a fast copy of the common disk tools. So the
build root is shared read-only over 9p and the command runs chrooted into an overlay:
the image's files (the same bytes as the build root's, in RAM) over the build root,
with a tmpfs on top for whatever the command writes outside its shares, and /proc,
/sys, /dev, /tmp and /run of its own (/dev and /run are the init's). busybox's applets
sit last on PATH, standing in only for programs the build root lacks.

The guest gets the build host's hostname, as the command would see it run directly.

``run.mode`` (``--mode``):

- ``image`` (default): the image over the build root, as above;
- ``root``: the build root alone (no image copies in front: ALT's vm-run's view);
- ``isolated``: the image alone, no build root share (also what a run falls back to
  when the kernel has no 9p or overlay, or the build root has no /proc for qemu's 9p
  server: said under -v).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from hshelper import guestabi, mapped9p
from hshelper.errors import HshelperError
from hshelper.guestrun import fstab, quote, write_and_mount
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Program, Share

NEEDS = {"image": {"9p", "9pnet_virtio", "overlay"}, "root": {"9p", "9pnet_virtio", "overlay"}}
N = guestabi.NEWROOT
RW = "/hshelper/rw"
UPPER, WORK = f"{RW}/upper", f"{RW}/work"


def isolated_because(mode: str, features: frozenset[str]) -> str | None:
    """Why the build root cannot be shared in ``mode`` (None: it can)."""
    missing = sorted(NEEDS.get(mode, set()) - features)
    if missing:
        return f"the kernel has no {', '.join(missing)} support"
    if mode in NEEDS and not os.path.isdir("/proc/self/fd"):
        return "/proc is not mounted here, and qemu's 9p server needs it"
    return None


@hookimpl
def hshelper_image_contents():
    # overlay is loaded at boot: a module loaded on demand costs a round trip through
    # the guest's modprobe script, and a saved VM state carries what was loaded.
    return Contents(programs=(Program("chroot"),), modules=("overlay?!",),
                    directories=(guestabi.ROOT_DIR, RW, N, "/hshelper/run"),
                    init_steps=(("overlay-upper", upper_code()),))


def upper_code() -> str:
    """Boot-time shell: the tmpfs for the overlay's upper and work directories. Its own
    mount, so the image's root (the overlay's lowest layer in mode image) does not hold
    them; made at boot, so a restored VM has it already (a tmpfs survives a save)."""
    return "\n".join([f"$hsh_mount -t tmpfs -o mode=0755 hshrw {RW}",
                      f"mkdir {UPPER} {WORK}"])


@hookimpl(tryfirst=True)  # the others see the mode it settles
def hshelper_run_spec(spec, config, args, image):
    mode = config.get("run", "mode")
    why = isolated_because(mode, image.features)
    if why:
        if config.origin("run", "mode") != "default":
            raise HshelperError(f"--mode {mode} shares the build root, but {why}",
                                hint="use --mode isolated (the image's programs only), or "
                                     "a kernel with 9p and overlay modules")
        if spec.verbose:
            print(f"hshelper: the command sees only the helper image's programs: {why}",
                  file=sys.stderr)
        return dataclasses.replace(spec, mode="isolated")
    if mode == "isolated":
        return dataclasses.replace(spec, mode=mode)
    root = Path(getattr(args, "sysroot", None) or "/").resolve()
    share = Share(root, guestabi.ROOT_DIR, readonly=True, tag="hshroot", automount=False)
    return dataclasses.replace(spec, mode=mode, shares=(share, *spec.shares))


def setup_code(mode: str, extra: list[tuple[str, str, str, str]] | tuple = ()) -> str:
    """Mount the build root, the overlay, the pseudo filesystems and the other plugins'
    mounts in it (``extra``: hshelper_root_mounts) with one mount program; chroot
    there."""
    lower = f"/:{guestabi.ROOT_DIR}" if mode == "image" else guestabi.ROOT_DIR
    # One fstab, mounted in order (the build root before the overlay on it); the upper
    # and work directories were made at boot (upper_code).
    table = fstab([
        # cache=loose: the build root does not change under a run, and every program
        # start looks its path up.
        ("hshroot", guestabi.ROOT_DIR, "9p",
         f"trans=virtio,version=9p2000.L,msize={mapped9p.MSIZE},cache=loose,ro"),
        ("hshroot", N, "overlay",
         f"lowerdir={lower},upperdir={UPPER},workdir={WORK}"),
        # The image has /proc, /sys, /dev, /tmp and /run, so they exist in the overlay.
        ("proc", f"{N}/proc", "proc", "defaults"),
        ("sysfs", f"{N}/sys", "sysfs", "defaults"),
        ("/dev", f"{N}/dev", "none", "rbind"),
        ("tmpfs", f"{N}/tmp", "tmpfs", "mode=1777"),
        # The init's /run: the device watcher, running since boot, keeps udev's
        # database there (plugin devlinks).
        ("/run", f"{N}/run", "none", "bind"),
        *extra,
    ])
    return "\n".join([
        *write_and_mount("newroot", table),
        f": >{quote(guestabi.NEWROOT_MARK)}",
        f"hsh_newroot={quote(N)}",
        f"hsh_chroot={quote(N)}",
    ])


def hostname_code(name: str) -> str:
    """The guest's hostname: the one the command would see run directly (the kernel's
    default, "(none)", ends up in what tools record: mdadm's homehost, LVM's
    creation_host)."""
    return f"echo {quote(name)} >/proc/sys/kernel/hostname"


@hookimpl
def hshelper_guest_setup(spec, root_mounts):
    steps = [("hostname", hostname_code(os.uname().nodename))]
    if spec.mode != "isolated":
        steps.append(("buildroot", setup_code(spec.mode, root_mounts)))
    return steps

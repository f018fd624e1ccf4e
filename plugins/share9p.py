"""Share host directories with the guest over virtio-9p (no root needed on the host).

The working directory is always shared at its own absolute path, so relative paths in a
recipe mean the same in the guest; ``--share DIR[:GUESTDIR][:ro]`` adds more. Files the
guest creates belong to the user running qemu: the build user. Inside the guest, root's
view of a writable share is that of a root-owned local filesystem (chown, mknod,
setuid bits), kept in xattrs where the host filesystem has them (hshelper.mapped9p).
QEMU's 9p server needs /proc (it reopens files through /proc/self/fd): without it every
create fails with a confusing ENOENT, so a missing /proc is diagnosed before boot. No
config keys.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from hshelper import guestabi, mapped9p
from hshelper.errors import HshelperError
from hshelper.guestrun import fstab_escape, quote
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Share
from hshelper.qemu import savedstate
from hshelper.sysroot import Sysroot

MODULES = ("9p?!", "9pnet_virtio?!")


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
    # Loaded at boot: nearly every run shares its working directory, and a module the
    # kernel asks for on demand costs a round trip through the guest's modprobe script.
    return Contents(modules=MODULES)


@hookimpl
def hshelper_run_spec(spec, args):
    shares = list(spec.shares)
    if not getattr(args, "no_share_cwd", False) and spec.cwd != "/":
        shares.insert(0, Share(Path(spec.cwd), spec.cwd))
    shares += getattr(args, "share", [])
    out = []
    untagged = 0
    for share in shares:
        if not share.tag:
            share = dataclasses.replace(share, tag=f"hsh{untagged}")
            untagged += 1
        if not share.readonly and share.automount:
            mapped = mapped9p.supported(share.host)
            if not mapped and spec.verbose:
                print(f"hshelper: {share.host} cannot hold user xattrs: root in the guest "
                      "cannot chown or mknod there", file=sys.stderr)
            share = dataclasses.replace(share, mapped=mapped)
        out.append(share)
    return dataclasses.replace(spec, shares=tuple(out))


def slotted(spec) -> list[Share]:
    """The shares qemu gets: the run's, and for a saved machine's shape an empty
    directory in every slot left (the build root's slot and SHARE_SLOTS others, with
    fixed tags: the guest read them at boot). Slot shares are never mounted."""
    shares = list(spec.shares)
    if not spec.slot_dir:
        return shares
    empty = Path(spec.slot_dir) / "empty"
    tags = {s.tag for s in shares}
    for tag in ("hshroot", *(f"hsh{i}" for i in range(savedstate.SHARE_SLOTS))):
        if tag not in tags:
            shares.append(Share(empty, "", readonly=True, tag=tag, automount=False))
    order = ["hshroot", *(f"hsh{i}" for i in range(savedstate.SHARE_SLOTS))]
    return sorted(shares, key=lambda s: order.index(s.tag) if s.tag in order else 99)


@hookimpl
def hshelper_qemu_args(spec, image, machine):
    if not spec.shares and not spec.slot_dir:
        return []
    if spec.shares and not {"9p", "9pnet_virtio"} <= image.features:
        raise HshelperError(
            f"kernel {image.kernel_version} has no 9p support (Debian's cloud kernel has "
            "none), so the working directory cannot be shared",
            hint=f"install a kernel with 9p modules (Debian: "
                 f"{machine.kernel_packages.get('debian', 'its generic kernel')}), or run "
                 "with --no-share-cwd and pass data on --disk images")
    if spec.shares and not os.path.isdir("/proc/self/fd"):
        raise HshelperError("/proc is not mounted here, and QEMU's 9p server needs it "
                            "(every file create in the share would fail with ENOENT)",
                            hint=needs_proc_hint())
    args = []
    for share in slotted(spec):
        if share.mapped:
            # Owners, modes and device nodes as root made them, kept in xattrs
            # (hshelper.mapped9p); new files readable on the host meanwhile.
            fsdev = (f"local,id={share.tag},path={share.host},security_model=mapped-xattr,"
                     "fmode=0644,dmode=0755")
        else:
            fsdev = f"local,id={share.tag},path={share.host},security_model=none"
        if share.readonly:
            fsdev += ",readonly=on"
        args += ["-fsdev", fsdev,
                 "-device", f"{machine.device('virtio-9p')},fsdev={share.tag},"
                            f"mount_tag={share.tag}"]
    return args


@hookimpl(hookwrapper=True)
def hshelper_run_vm(spec):
    started = time.time()
    try:
        yield
    finally:
        for share in spec.shares:
            if share.mapped:
                mapped9p.settle(share.host, started)


def options(share: Share) -> str:
    opts = f"trans=virtio,version=9p2000.L,msize={mapped9p.MSIZE},cache=mmap"
    return opts + ",ro" if share.readonly else opts


# The command's root mounts its own file systems here: a directory of the build root
# below them is not there for a share to be mounted on.
OWN_MOUNTS = ("/proc", "/sys", "/dev", "/tmp", "/run")


def in_build_root(spec, guest: str) -> bool:
    """Whether ``guest`` is a directory of the command's root as it is (in the build
    root, no symlink on the way, not below the root's own mounts or another share): a
    share can then be mounted there with the root itself (hshelper_root_mounts), no
    mkdir first."""
    below = OWN_MOUNTS + tuple(s.guest for s in spec.shares
                               if s.automount and s.guest != guest)
    if spec.mode == "isolated" or any(guest == m or guest.startswith(m.rstrip("/") + "/")
                                      for m in below):
        return False  # a share inside another is mounted on what the other shows
    root = spec.share_at(guestabi.ROOT_DIR)
    if root is None:
        return False
    try:
        found = Sysroot(root.host).resolve(guest)
    except OSError:
        return False
    return found.path == guest and not found.links and found.host.is_dir()


@hookimpl
def hshelper_root_mounts(spec):
    return [(s.tag, f"{guestabi.NEWROOT}{s.guest}", "9p", options(s))
            for s in spec.shares if s.automount and in_build_root(spec, s.guest)]


@hookimpl
def hshelper_guest_setup(spec, root_mounts):
    # The shares hshelper_root_mounts could not place (made directories, or the image
    # alone), mounted by a step.
    placed = {where for _, where, _, _ in root_mounts}
    shares = [s for s in spec.shares
              if s.automount and f"{guestabi.NEWROOT}{s.guest}" not in placed]
    if not shares:
        return []
    entries = [(share.tag, share.guest, "9p", options(share)) for share in shares]
    # Where the command sees them: under its root when that is the overlay (after the
    # overlay's own /tmp, so a working directory under /tmp is shared too). The
    # mount points are made only where missing (each program start costs under TCG).
    dirs = " ".join(f'"$hsh_newroot"{quote(s.guest)}' for s in shares)
    lines = [f"for hsh_d in {dirs}; do [ -d \"$hsh_d\" ] || mkdir -p \"$hsh_d\"; done",
             # The fstab's mount points, prefixed with the command's root, by printf.
             "printf '%s\\n' " + " ".join(
                 f'{quote(tag + " ")}"$hsh_newroot"'
                 f'{quote(f"{fstab_escape(where)} {kind} {opts} 0 0")}'
                 for tag, where, kind, opts in entries) + " >/hshelper/run/fstab.shares",
             "$hsh_mount -a -T /hshelper/run/fstab.shares"]
    return [("share9p", "\n".join(lines))]

"""What udev would do, in a guest that has none: /dev/disk/by-* links, udev's device
database, and tools that would wait for udev told not to.

- /dev/disk/by-uuid, by-label, by-partuuid and by-partlabel links for every block
  device, and its entry in udev's database under the command's /run (what lsblk and
  ``udevadm info`` read properties from), remade when a device appears or a program
  that wrote to it (mkfs) is done (hshelper/guest/devlinks, a watcher started at
  boot, so that a saved VM state holds it running);
- ``udevadm settle`` / ``trigger`` bring the links and the database up to date before
  they return. The build root's own udevadm would return at once ("Running in chroot,
  ignoring request"), so where it is installed hshelper's stand-in is bind-mounted over
  it for the run, and passes every other subcommand (info, ...) to the real one;
  where none is installed, the stand-in is last on PATH, like the applets (``--mode
  root`` shows the build root alone: no stand-in there; the watcher still makes the
  links, only ``settle`` does not wait for it);
- ``DM_DISABLE_UDEV=1`` in the command's environment: libdevmapper (dmsetup, kpartx,
  LVM, cryptsetup) makes its device nodes itself instead of waiting for udev.

No config keys.
"""

from __future__ import annotations

from hshelper import guest, guestabi
from hshelper.guestrun import guest_env
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, File, Program
from hshelper.sysroot import Sysroot

STAND_IN = "/hshelper/bb/udevadm"
REAL = "/hshelper/udevadm.real"  # the build root's udevadm, bound here for a run
READY = "/tmp/.hshelper-devlinks.ready"  # the watcher's first look is done
UDEVADM = f"""#!/bin/sh
# hshelper's udevadm: the guest has no udev daemon (hshelper/guest/devlinks does its work).
case $1 in
settle | trigger) exec /bin/sh /hshelper/devlinks settle ;;
esac
# Anything else: the build root's own udevadm, when it is installed.
[ -s {REAL} ] && exec {REAL} "$@"
exit 0
"""


@hookimpl
def hshelper_image_contents():
    script = guest.read("devlinks")
    return Contents(files=(File("/hshelper/devlinks", data=script, mode=0o755),
                           File(STAND_IN, data=UDEVADM.encode(), mode=0o755),
                           File(REAL, data=b"", mode=0o755)),  # a mount point
                    programs=(Program("blkid", applet=False), Program("readlink"),
                              Program("rm"), Program("mkfifo")),
                    init_steps=(("devlinks", watcher_code()),))


def udevadm_in_root(spec) -> str | None:
    """The build root's udevadm that the command would run (the first on its PATH), in
    mode image (the image over the build root: the stand-in is in it); None otherwise.
    Looked up on the host: in the guest, each directory on PATH cost a lookup through
    the overlay and 9p."""
    if spec.mode != "image":
        return None
    root = spec.share_at(guestabi.ROOT_DIR)
    if root is None:
        return None
    path = dict(guest_env(spec.env))["PATH"].split(":")
    stand_in_dir = STAND_IN.rsplit("/", 1)[0]
    return Sysroot(root.host).which("udevadm", tuple(d for d in path if d != stand_in_dir))


def setup_code() -> str:
    """Shell for the init: libdevmapper makes its own nodes instead of waiting for udev."""
    return 'hsh_guest_env="$hsh_guest_env DM_DISABLE_UDEV=1"'


def watcher_code() -> str:
    """Boot-time shell: start the watcher and wait (up to 10 s) until it has probed the
    devices there are at boot. Started at boot, it is running in a saved VM state with
    its first look done, and a restored run starts nothing for it (started per run, it
    ran beside the command on the one vCPU: 60 ms of a restored `helper-run true`). Its
    database is the init's /run, which the command's root binds (plugin buildroot)."""
    return "\n".join([
        "mkdir -p /dev/disk",
        # Detached from every channel; busybox's shell where there is one (its read
        # builtin can wait, so an idle watcher starts nothing).
        "if command -v busybox >/dev/null 2>&1; then hsh_dl_sh='busybox sh'; "
        "else hsh_dl_sh=/bin/sh; fi",
        f"$hsh_dl_sh /hshelper/devlinks watch /run {READY} </dev/null >/dev/null 2>&1 &",
        "hsh_i=0",
        f'while [ ! -e {READY} ] && [ "$hsh_i" -lt 500 ]; do',
        "    sleep 0.02 2>/dev/null || :",
        "    hsh_i=$((hsh_i + 1))",
        "done",
    ])


@hookimpl
def hshelper_root_mounts(spec):
    # The stand-in over the build root's udevadm, and the real one where the stand-in
    # passes other subcommands on: binds leave the build root untouched.
    udevadm = udevadm_in_root(spec)
    if not udevadm:
        return []
    root = guestabi.NEWROOT
    return [(f"{root}{udevadm}", f"{root}{REAL}", "none", "bind"),
            (f"{root}{STAND_IN}", f"{root}{udevadm}", "none", "bind")]


@hookimpl
def hshelper_guest_setup():
    return [("devlinks", setup_code())]

"""What udev would do, in a guest that has none: /dev/disk/by-* links, and tools that
would wait for udev told not to.

- /dev/disk/by-uuid, by-label, by-partuuid and by-partlabel links for every block
  device, remade when a device appears or a program that wrote to it (mkfs) is done
  (hshelper/guest/devlinks, a watcher started before the command);
- ``udevadm settle`` / ``trigger``: the build root's own udevadm where installed (it
  returns at once without a udev daemon); otherwise a stand-in that brings the links
  up to date before it returns;
- ``DM_DISABLE_UDEV=1`` in the command's environment: libdevmapper (dmsetup, kpartx,
  LVM, cryptsetup) makes its device nodes itself instead of waiting for udev.

No config keys.
"""

from __future__ import annotations

from importlib import resources

from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, File, Program

UDEVADM = """#!/bin/sh
# hshelper's stand-in for udevadm: the build root has none, and the guest has no udev.
case $1 in
settle | trigger) exec /bin/sh /hshelper/devlinks settle ;;
*) exit 0 ;;
esac
"""


@hookimpl
def hshelper_image_contents(sysroot):
    script = resources.files("hshelper.guest").joinpath("devlinks").read_bytes()
    files = [File("/hshelper/devlinks", data=script, mode=0o755)]
    if not sysroot.which("udevadm"):
        # Last on the command's PATH, like the applets: only where nothing else is.
        files.append(File("/hshelper/bb/udevadm", data=UDEVADM.encode(), mode=0o755))
    return Contents(files=tuple(files),
                    programs=(Program("blkid", applet=False), Program("readlink"),
                              Program("sed"), Program("rm"), Program("mkfifo")))


@hookimpl
def hshelper_guest_setup():
    # The watcher runs beside the command, detached from its channels; busybox's shell
    # where there is one (its read builtin can wait, so an idle watcher starts nothing).
    # The braces move stderr off the command's port before the fork: a virtio port
    # opens once at a time, and a child that had not yet redirected its inherited copy
    # made the command's own open of that port fail (EBUSY).
    return [("devlinks", "\n".join([
        'hsh_guest_env="$hsh_guest_env DM_DISABLE_UDEV=1"',
        "mkdir -p /dev/disk",
        "if command -v busybox >/dev/null 2>&1; then hsh_dl_sh='busybox sh'; "
        "else hsh_dl_sh=/bin/sh; fi",
        "{ $hsh_dl_sh /hshelper/devlinks watch </dev/null >/dev/null 3>&- & } 2>/dev/null",
    ]))]

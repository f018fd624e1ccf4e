"""The contract between the host and the guest init, in one place.

The guest init (hshelper/guest/init) and the host agree on these names; a test checks
that the init uses every one of them. Changing one is an ABI change: the image's cache
key covers the init's text, so old images are never booted by new code.

Channels are virtio-serial ports named ``org.hshelper.<port>``:

- ``control``, both ways. The guest writes one line per event: ``ready`` (booted, waiting
  for its orders: a saved VM state is taken exactly here, unless it says ``ready
  nosave``), ``started`` (the command begins), ``status N`` (its exit status). The host
  answers ``ready`` with the run script: a line ``script SIZE`` and SIZE bytes of POSIX
  shell, which the init sources.
- ``stdout``, ``stderr``: the command's output, to the host.
- ``stdin``: the host's stdin, to the command (when it is forwarded).

The kernel console (the machine's first serial port) carries the kernel log and the
init's own messages; the host keeps it in a log file.
"""

from __future__ import annotations

PORT_PREFIX = "org.hshelper."
CONTROL, STDOUT, STDERR, STDIN = "control", "stdout", "stderr", "stdin"
PORTS = (CONTROL, STDOUT, STDERR, STDIN)

# Lines the guest writes on the control port ("error TEXT": the init itself failed,
# before "status 125").
READY, STARTED, STATUS, ERROR = "ready", "started", "status", "error"
# "ready nosave": a guest that could not reseed its RNG (hshelper/reseed.py) at boot would
# not after a restore either, so no state of it is saved.
NOSAVE = "nosave"
# The host's answer to READY: "script SIZE\n" then SIZE bytes.
SCRIPT = "script"

# Paths in the guest.
MODULE_DIR = "/hshelper/modules"  # boot modules, unpacked and unsigned
APPLET_DIR = "/hshelper/bb"  # busybox applets: first on the init's PATH, last on the command's
RUN_SCRIPT = "/hshelper/run/run.sh"  # the run script, as received
ROOT_DIR = "/hshelper/root"  # the build root's share (read-only)
NEWROOT = "/hshelper/newroot"  # the command's root: the image over the build root
NEWROOT_MARK = "/hshelper/run/newroot"  # exists once NEWROOT is ready (for modprobe)
RESEED = "/hshelper/reseed"  # the RNG reseed program, on machines without vmgenid

# Shell variables and functions the init defines for the run script and plugin steps.
SHELL_NAMES = {
    "hsh_mount": "the cheapest mount program for explicit -t mounts (busybox's if any)",
    "hsh_guest_env": "NAME=VALUE words only the guest knows (disk devices), for the command",
    "hsh_chroot": "set by a step: run the command chrooted into this directory",
    "hsh_newroot": "where the command's / is, seen from the init ('' when isolated)",
    "hsh_load": "hsh_load MOD...: load the image's modules in this order (one program)",
    "hsh_setup": "defined by the run script: the plugins' per-run steps, in order",
    "hsh_payload": "defined by the run script: runs the command with its environment",
}

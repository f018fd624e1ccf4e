"""vm-run's command line (ALT's rpm-build-vm), so a ``%check`` moves to hshelper by
renaming the program: ``vm-run --kvm=cond --mem=1G 'make check'`` -> ``helper-run ...``.

Every option vm-run documents is handled here, in one of three ways (the table with
the reasons is in docs/integrations.md, "ALT vm-run users"):

- mapped onto hshelper's own option at parse time, so the core sees one consistent
  set: ``--kvm=MODE`` (every spelling vm-run's ``case`` accepts), ``--tcg``,
  ``--mem=SIZE|max``, ``--cpu=N|max``, ``--maxcpu=N``, ``--modules='A B'``,
  ``--kernel=FLAVOUR``, ``--heredoc``, ``--initrd``, ``--no-quiet``, ``--loglevel=N``
  and the shell options ``-x +x -e +e`` (and pairs such as ``-ex``, ``+xe``);
- accepted and ignored where hshelper's own behaviour already is what the option asks
  for, or the option only tunes vm-run's own VM: ``--sbin``, ``-s``/``--silent``,
  ``--stdout``, ``--depmod``, ``--swap``, ``--hvc``, ``--multidevs=``, ``--sandbox=``,
  ``--stub-exit=``;
- refused with a one-line reason and exit 2 where hshelper cannot do what it asks
  (``--rootfs``, ``--overlay``, ``--user``, ``--udevd``, ``--bios``, raw qemu options...).

Command text (a single argument with shell syntax, or the script of ``--heredoc``) runs
with vm-run's shell options, ``-ex`` unless changed: the first failing command stops
it, and each command is traced to stderr. No config keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import sys
import textwrap
from collections.abc import Sequence

from hshelper.argtypes import MIN_MEMORY_MIB, memory_mib, positive_int
from hshelper.errors import EXIT_USAGE, HshelperError
from hshelper.hookspecs import hookimpl

# vm-run's --kvm=MODE, exactly the spellings of its `case "$KVM"` -> (--accel, skip).
KVM_MODES = {
    "try": ("auto", False), "detect": ("auto", False),  # KVM if it works, else TCG
    "cond": ("auto", True), "if": ("auto", True),  # no working KVM: warn, exit 0
    "only": ("kvm", False), "force": ("kvm", False), "enable": ("kvm", False),
    "any": ("auto", False), "all": ("auto", False),  # qemu's accel=kvm:tcg
    "default": ("tcg", False),  # qemu's own default accelerator: TCG
    "no": ("tcg", False), "off": ("tcg", False), "false": ("tcg", False),
    "tcg": ("tcg", False), "": ("tcg", False),
    "auto": ("auto", False),  # hshelper's own word for try (its --accel auto)
}
# vm-run runs command text under `set -ex` (its BASHMINUS), changed by these words.
DEFAULT_SHELL_OPTIONS = ("-e", "-x")
SHELL_OPTION_WORDS = tuple(f"{sign}{a}{b}" for sign in "-+" for a in "xe" for b in ("", "x", "e"))
MIN_MEMORY = MIN_MEMORY_MIB
# Shell syntax in a lone argument: vm-run hands such an argument to the shell.
SHELL_TEXT = re.compile(r"[\s;&|<>()$`\\\"'*?]")

# vm-run's options hshelper cannot honour, with what to do instead.
_ROOTFS = ("hshelper boots no root filesystem image: --mode root shares the build root "
           "read-only, --disk attaches images")
_FIRMWARE = ("hshelper boots the kernel directly on its own machine; boot a finished "
             "image with qemu itself")
REFUSED = {
    "--rootfs": _ROOTFS, "--create-rootfs": _ROOTFS, "--ext4": _ROOTFS,
    "--no-bind": _ROOTFS, "--no-snapshot": _ROOTFS, "--rsync": _ROOTFS,
    "--overlay": "no overlay over the build root; the working directory is shared "
                 "writable and /tmp is a tmpfs",
    "--no-virtio": "disks are virtio-blk (--disk)", "--scsi": "disks are virtio-blk (--disk)",
    "--sudo": "the command runs as root in the VM (no fake sudo, no other user)",
    "--user": "the command runs as root in the VM (no fake sudo, no other user)",
    "--udevd": "the guest has no udev: a disk is /dev/disk/hshelper/NAME, partitions "
               "appear when the table is read",
    "--bios": _FIRMWARE, "--uefi": _FIRMWARE, "--secureboot": _FIRMWARE,
    "--microvm": _FIRMWARE,
    "--drive": "attach an image with --disk PATH[,format=raw|qcow2][,ro]",
    "--fat": "share a directory with --share DIR[:GUESTDIR][:ro]",
    "--rdadd": "add a program (with its libraries) with --with PROG",
    "--tmp": "the guest's /tmp is a tmpfs in guest memory: give more with --mem",
}
# vm-run passes these straight to qemu; hshelper makes qemu's command line itself.
QEMU_OPTIONS = (
    "-add-fd", "-accel", "-acpitable", "-action", "-bios", "-blockdev", "-boot", "-cdrom",
    "-chardev", "-compat", "-cpu", "-debugcon", "-device", "-drive", "-dtb", "-fda",
    "-fsdev", "-fw_cfg", "-gdb", "-global", "-hda", "-hdb", "-hdc", "-hdd", "-icount", "-m",
    "-M", "-machine", "-mon", "-msg", "-mtdblock", "-netdev", "-nic", "-numa", "-object",
    "-overcommit", "-pflash", "-plugin", "-qmp", "-qmp-pretty", "-readconfig", "-rtc",
    "-sd", "-serial", "-smbios", "-smp", "-tpmdev", "-trace", "-virtfs",
)
# Accepted and ignored: hshelper already behaves so, or they tune vm-run's own VM.
IGNORED_FLAGS = ("--sbin", "-s", "--silent", "--stdout", "--depmod", "--swap", "--hvc")
IGNORED_VALUES = ("--multidevs", "--sandbox", "--stub-exit")


def available_mib() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def max_memory(available: int | None, rlimit_as: int) -> int:
    """vm-run's ``--mem=max`` made safe: half the available memory (the build host
    runs other jobs), at most what RLIMIT_AS leaves room for (qemu maps ~400 MiB more)."""
    memory = (available or 1024) // 2
    if rlimit_as != resource.RLIM_INFINITY:
        memory = min(memory, rlimit_as // 2**20 - 400)
    return max(memory, MIN_MEMORY)


def parse_mem(text: str) -> int | None:
    """vm-run's --mem value -> MiB; None for an empty value (vm-run then passes no -m:
    the default size). A bare number means MiB, as qemu's ``-m`` reads it."""
    value = text.strip().lower()
    if value == "":
        return None
    if value == "max":
        return max_memory(available_mib(), resource.getrlimit(resource.RLIMIT_AS)[0])
    return memory_mib("--mem", text)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cpu(text: str) -> int:
    if text.strip().lower() == "max":
        return usable_cpus()
    return positive_int("--cpu")(text)


def shell_flags(words: Sequence[str]) -> tuple[str, ...]:
    """The sh flags for command text: vm-run's ``-ex``, then each word as ``set``
    reads it (``+x`` turns tracing off, ``-xe`` both on), as sh's own options."""
    state = {letter: f"-{letter}" in DEFAULT_SHELL_OPTIONS for letter in "ex"}
    for word in words:
        for letter in word[1:]:
            state[letter] = word[0] == "-"
    return tuple(f"-{letter}" for letter in "ex" if state[letter])


def shell_command(argv: tuple[str, ...], cwd: str,
                  flags: tuple[str, ...] = DEFAULT_SHELL_OPTIONS) -> tuple[str, ...]:
    """vm-run runs a single argument with shell syntax as a script under its shell
    options; so does this. A lone argument that names an existing file stays a
    program, and a command of several arguments runs as it is (no shell)."""
    if len(argv) != 1 or not SHELL_TEXT.search(argv[0]):
        return argv
    if os.path.exists(os.path.join(cwd, argv[0])):
        return argv
    return ("sh", *flags, "-c", argv[0])


def flavour_match(versions: list[str], flavour: str) -> str | None:
    """The first (newest) version that has ``flavour`` as a whole '-'-separated part
    (``un-def`` in ``6.1.90-un-def-alt1``); None if none has."""
    for version in versions:
        if f"-{flavour}-" in f"-{version}-":
            return version
    return None


def refusal(option: str) -> str:
    reason = REFUSED.get(option, "hshelper makes qemu's command line itself; plugins "
                                 "add devices, shares and disks")
    return f"vm-run's {option} is not supported by helper-run: {reason}"


class _Action(argparse.Action):
    """Set hshelper's own option from a vm-run option as it is parsed (a bad value
    raises HshelperError: one line, exit 2)."""

    def __call__(self, parser, namespace, values, option_string=None):
        self.apply(namespace, values, option_string)

    def apply(self, namespace, value, option):
        raise NotImplementedError


class _Kvm(_Action):
    def apply(self, namespace, value, option):
        if value not in KVM_MODES:
            raise HshelperError(f"--kvm={value}: unknown mode (vm-run's are try, detect, "
                                "cond, if, only, force, enable, any, all, default, no, off, "
                                "false, tcg)", status=EXIT_USAGE)
        accel, skip = KVM_MODES[value]
        namespace.accel = accel
        namespace.skip_without_kvm = skip or namespace.skip_without_kvm


class _Tcg(_Action):
    def apply(self, namespace, value, option):
        namespace.accel = "tcg"


class _Mem(_Action):
    def apply(self, namespace, value, option):
        mib = parse_mem(value)
        if mib is not None:
            namespace.memory = mib


class _Cpu(_Action):
    def apply(self, namespace, value, option):
        namespace.cpus = parse_cpu(value)


class _Modules(_Action):
    def apply(self, namespace, value, option):
        names = [m for m in re.split(r"[,\s]+", value) if m]
        namespace.with_modules = [*(getattr(namespace, "with_modules", None) or []), *names]


class _Heredoc(_Action):
    def apply(self, namespace, value, option):
        namespace.implied_command = ("sh", "-s")


class _ShellOption(_Action):
    def apply(self, namespace, value, option):
        namespace.shell_options = [*(getattr(namespace, "shell_options", None) or []),
                                   option]


class _Initrd(_Action):
    def apply(self, namespace, value, option):
        namespace.mode = "image"  # vm-run --initrd: the command runs in its initramfs


class _Loglevel(_Action):
    """--no-quiet and --loglevel=N: the boot messages, on stderr as they come."""

    def apply(self, namespace, value, option):
        if option == "--no-quiet":
            words = ["loglevel=7"]
        elif value.isdigit():
            words = [f"loglevel={value}"]
        else:
            words = ["ignore_loglevel"]
        namespace.append = [*namespace.append, *words]
        namespace.verbose = True


class _Refuse(_Action):
    def apply(self, namespace, value, option):
        raise HshelperError(refusal(option), status=EXIT_USAGE)


def _add_compatible(group) -> None:
    group.add_argument("--kvm", action=_Kvm, metavar="MODE",
                       help="try/detect/any/all: KVM when it really works, else TCG; "
                            "cond/if: without working KVM warn and exit 0; "
                            "only/force/enable: KVM or exit 125; no/off/false/tcg/default: "
                            "TCG")
    group.add_argument("--tcg", action=_Tcg, nargs=0, help="do not use KVM (--accel tcg)")
    group.add_argument("--mem", action=_Mem, metavar="SIZE",
                       help="guest memory: 512 (MiB, as qemu's -m), 768M, 2G, or max (half "
                            "the available memory)")
    group.add_argument("--cpu", action=_Cpu, metavar="N",
                       help="guest CPUs, or max (every CPU this process may use)")
    group.add_argument("--maxcpu", type=positive_int("--maxcpu"), metavar="N",
                       help="at most N guest CPUs")
    group.add_argument("--modules", action=_Modules, metavar="'A B'",
                       help="kernel modules to add (space- or comma-separated)")
    group.add_argument("--heredoc", action=_Heredoc, nargs=0,
                       help="run the shell script read from stdin (with the shell options)")
    group.add_argument("-x", "+x", "-e", "+e", action=_ShellOption, nargs=0,
                       dest="shell_options",
                       help="shell options for command text, as set takes them (default "
                            "-ex: stop at the first failing command, trace each to stderr)")
    group.add_argument(*[w for w in SHELL_OPTION_WORDS if len(w) == 3], action=_ShellOption,
                       nargs=0, dest="shell_options", help=argparse.SUPPRESS)
    group.add_argument("--initrd", action=_Initrd, nargs=0,
                       help="run in the helper image's own programs (--mode image)")
    group.add_argument("--no-quiet", action=_Loglevel, nargs=0,
                       help="show the kernel's boot messages on stderr")
    group.add_argument("--loglevel", action=_Loglevel, metavar="N",
                       help="the kernel's console loglevel; the messages go to stderr")
    group.add_argument("--kernels", action="store_true",
                       help="list the kernels of the build root (no VM)")
    group.add_argument("--sbin", action="store_true",
                       help="accepted; the guest's PATH always has the sbin directories")


@hookimpl
def hshelper_add_arguments(parser, command):
    if command != "run":
        return
    group = parser.add_argument_group(
        "vm-run compatible options",
        textwrap.fill("ALT's vm-run options. The ones hshelper cannot honour are refused "
                      "with the reason (exit 2); docs/integrations.md has them all.", 77))
    _add_compatible(group)
    for flag in IGNORED_FLAGS:
        if flag != "--sbin":
            group.add_argument(flag, action="store_true", dest=f"ignored_{flag.strip('-')}",
                               help=argparse.SUPPRESS)
    for option in IGNORED_VALUES:
        group.add_argument(option, metavar="VALUE", help=argparse.SUPPRESS)
    for option in REFUSED:
        group.add_argument(option, action=_Refuse, nargs="?", help=argparse.SUPPRESS)
    for option in QEMU_OPTIONS:
        group.add_argument(option, action=_Refuse, nargs=1, dest=f"qemu_{option}",
                           help=argparse.SUPPRESS)


@hookimpl
def hshelper_answer_on_host(args):
    if not getattr(args, "kernels", False):
        return None
    from hshelper.sysroot import Sysroot

    kernels = Sysroot(args.sysroot).kernels()
    for kernel in kernels:
        print(f"{kernel.version}\t{kernel.image}")
    if not kernels:
        print("hshelper: no kernel in the build root", file=sys.stderr)
        return 1
    return 0


@hookimpl
def hshelper_find_kernel(sysroot, version):
    if not version:
        return None
    versions = [k.version for k in sysroot.kernels()]
    if version in versions:
        return None  # an exact version: the kernel plugin's answer
    match = flavour_match(versions, version)
    return sysroot.kernel(match) if match else None


@hookimpl
def hshelper_run_spec(spec, config, args):
    flags = shell_flags(getattr(args, "shell_options", None) or ())
    maxcpu = getattr(args, "maxcpu", None)
    if maxcpu and not config.get("run", "cpus") and spec.cpus > maxcpu:
        # As vm-run: --maxcpu bounds the default count, not one asked for (--cpu).
        spec = dataclasses.replace(spec, cpus=maxcpu)
    implied = getattr(args, "implied_command", None)
    if implied and spec.argv != implied:
        raise HshelperError("--heredoc reads the script from stdin: give no command with it",
                            status=EXIT_USAGE)
    if implied:
        if not spec.stdin:
            raise HshelperError("--heredoc reads the script from stdin, but stdin is a "
                                "terminal (or --no-stdin was given)", status=EXIT_USAGE)
        return dataclasses.replace(spec, argv=("sh", *flags, "-s"))
    argv = shell_command(spec.argv, spec.cwd, flags)
    return dataclasses.replace(spec, argv=argv)

"""vm-run's options (ALT's rpm-build-vm), so a ``%check`` moves to hshelper by renaming
the program: ``vm-run --kvm=cond --mem=1G make check`` -> ``helper-run --kvm=cond ...``.

Each option maps onto hshelper's own at parse time (so the core sees one consistent set):

==================  ==========================================================
``--kvm=cond``      ``--skip-without-kvm``: no working KVM -> warn, exit 0
``--kvm=only``      ``--accel kvm`` (also ``always``): no KVM -> exit 125
``--kvm=try``       ``--accel auto`` (also ``any``, ``auto``, ``yes``)
``--kvm=no``        ``--accel tcg`` (also ``never``, ``off``, ``tcg``)
``--mem=SIZE``      ``--memory``: ``512`` (MiB, as qemu's -m), ``768M``, ``2G``, ``max``
``--cpu=N``         ``--cpus`` (``max``: every host CPU)
``--modules=A,B``   ``--module A --module B``
``--kernel=FLAV``   a version, or a flavour matched inside it (``un-def``, ``amd64``)
``--heredoc``       the command is ``sh -s``: the script comes on stdin
``--sbin``          accepted; the guest's PATH always has the sbin directories
``--append=WORDS``  the same in both (kernel command line)
==================  ==========================================================

And as vm-run does, a single argument that is shell text (``"cd t && ./run"``) runs
with ``sh -c``. What differs is in docs/integrations.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource

from hshelper.errors import HshelperError
from hshelper.hookspecs import hookimpl

KVM_MODES = {
    "cond": ("auto", True), "only": ("kvm", False), "always": ("kvm", False),
    "try": ("auto", False), "any": ("auto", False), "auto": ("auto", False),
    "yes": ("auto", False), "no": ("tcg", False), "never": ("tcg", False),
    "off": ("tcg", False), "tcg": ("tcg", False),
}
MIB = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
MIN_MEMORY = 96  # MiB: below this the helper kernel does not boot
# Shell syntax in a lone argument: vm-run hands such an argument to the shell.
SHELL_TEXT = re.compile(r"[\s;&|<>()$`\\\"'*?]")


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


def parse_mem(text: str) -> int:
    """vm-run's --mem value -> MiB. A bare number means MiB, as qemu's ``-m`` reads it."""
    value = text.strip().lower()
    if value == "max":
        return max_memory(available_mib(), resource.getrlimit(resource.RLIMIT_AS)[0])
    match = re.fullmatch(r"(\d+)([kmgt]?)(i?b)?", value)
    if not match:
        raise HshelperError(f"--mem={text}: expected a size (512, 768M, 2G) or max", status=2)
    mib = int(int(match.group(1)) * MIB[match.group(2)])
    if mib < MIN_MEMORY:
        raise HshelperError(f"--mem={text}: the helper VM needs at least {MIN_MEMORY}M",
                            status=2)
    return mib


def parse_cpu(text: str) -> int:
    if text.strip().lower() == "max":
        return os.cpu_count() or 1
    if not text.strip().isdigit() or int(text) < 1:
        raise HshelperError(f"--cpu={text}: expected a number of CPUs or max", status=2)
    return int(text)


def shell_command(argv: tuple[str, ...], cwd: str) -> tuple[str, ...]:
    """vm-run runs a single argument with shell syntax as a script; so does this. A
    lone argument that names an existing file stays a program."""
    if len(argv) != 1 or not SHELL_TEXT.search(argv[0]):
        return argv
    if os.path.exists(os.path.join(cwd, argv[0])):
        return argv
    return ("sh", "-c", argv[0])


def flavour_match(versions: list[str], flavour: str) -> str | None:
    """The first (newest) version that has ``flavour`` as a whole '-'-separated part
    (``un-def`` in ``6.1.90-un-def-alt1``); None if none has."""
    for version in versions:
        if f"-{flavour}-" in f"-{version}-":
            return version
    return None


class _Action(argparse.Action):
    """Set hshelper's own option from a vm-run option as it is parsed (a bad value
    raises HshelperError: one line, exit 2)."""

    def __call__(self, parser, namespace, values, option_string=None):
        self.apply(namespace, values)

    def apply(self, namespace, value):
        raise NotImplementedError


class _Kvm(_Action):
    def apply(self, namespace, value):
        accel, skip = KVM_MODES[value]
        namespace.accel = accel
        namespace.skip_without_kvm = skip or namespace.skip_without_kvm


class _Mem(_Action):
    def apply(self, namespace, value):
        namespace.memory = parse_mem(value)


class _Cpu(_Action):
    def apply(self, namespace, value):
        namespace.cpus = parse_cpu(value)


class _Modules(_Action):
    def apply(self, namespace, value):
        names = [m for m in re.split(r"[,\s]+", value) if m]
        namespace.with_modules = [*(getattr(namespace, "with_modules", None) or []), *names]


class _Heredoc(_Action):
    def apply(self, namespace, value):
        namespace.implied_command = ("sh", "-s")


@hookimpl
def hshelper_add_arguments(parser, command):
    if command != "run":
        return
    group = parser.add_argument_group("vm-run compatible options")
    group.add_argument("--kvm", action=_Kvm, choices=sorted(KVM_MODES), metavar="MODE",
                       help="cond: skip without KVM; only: require it; try: use it when "
                            "it works; no: TCG")
    group.add_argument("--mem", action=_Mem, metavar="SIZE",
                       help="guest memory: 512 (MiB), 768M, 2G or max")
    group.add_argument("--cpu", action=_Cpu, metavar="N", help="guest CPUs, or max")
    group.add_argument("--modules", action=_Modules, metavar="A,B",
                       help="kernel modules to add (comma-separated)")
    group.add_argument("--heredoc", action=_Heredoc, nargs=0,
                       help="run the shell script read from stdin")
    group.add_argument("--sbin", action="store_true",
                       help="accepted for vm-run; the sbin directories are always on PATH")


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
def hshelper_run_spec(spec, args):
    if getattr(args, "implied_command", None) and spec.argv == args.implied_command:
        if not spec.stdin:
            raise HshelperError("--heredoc reads the script from stdin, but stdin is a "
                                "terminal (or --no-stdin was given)", status=2)
        return None
    argv = shell_command(spec.argv, spec.cwd)
    return dataclasses.replace(spec, argv=argv) if argv != spec.argv else None

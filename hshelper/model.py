"""The values that flow between hshelper's stages and through its plugin hooks.

All frozen dataclasses: a stage receives them, never changes them, and hands new ones on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Program:
    """A program the image should hold.

    ``name``: a name looked up on the build root's PATH, or an absolute guest path.
    ``required``: a missing one is an error (else it is left out quietly and reported).
    ``applet``: a busybox applet may stand in for it when busybox is installed and the
    real program is not (or ``prefer_applet`` is set: one busybox file is smaller than
    many programs and their libraries). ``applet=False`` insists on the real program;
    merged with other requests for the same name, it wins (``--with cp`` means GNU cp).
    ``essential``: included whenever installed, whatever it weighs; other optional
    programs are left out when their own files and libraries exceed
    ``image.program_budget_kb`` (and reported, with the ``--with`` that adds them).
    """

    name: str
    required: bool = False
    applet: bool = True
    prefer_applet: bool = False
    essential: bool = False


@dataclass(frozen=True)
class File:
    """A file to put into the image at ``dest``: copied from ``source`` (a guest path in
    the build root) or made from ``data``; ``mode`` is the permission bits."""

    dest: str
    source: str | None = None
    data: bytes | None = None
    mode: int = 0o644


@dataclass(frozen=True)
class Device:
    """A device node written into the archive itself (no mknod, so no root needed)."""

    path: str
    kind: str  # "c" or "b"
    major: int
    minor: int
    mode: int = 0o600


@dataclass(frozen=True)
class Contents:
    """What one plugin contributes to the image (hook ``hshelper_image_contents``).

    ``modules`` use the kernel-modules.lst syntax: "name", or "name?" when optional.
    ``init_steps`` are (name, POSIX shell code) pairs the guest init runs at boot, after
    the modules are loaded and before the payload, in plugin order.
    """

    modules: tuple[str, ...] = ()
    programs: tuple[Program, ...] = ()
    files: tuple[File, ...] = ()
    directories: tuple[str, ...] = ()
    devices: tuple[Device, ...] = ()
    init_steps: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageResult:
    """A built (or cached) helper image: the kernel to boot and the initrd for it."""

    kernel_version: str
    kernel: Path  # host path of the kernel image as installed
    initrd: Path  # host path of the cached initrd
    manifest: Path  # host path of the manifest (JSON lines, one per archive entry)
    key: str  # content address of the image
    cached: bool  # True when it was a cache hit
    seconds: float
    size: int
    compression: str
    modules: tuple[str, ...]
    files: int
    missing: tuple[str, ...] = ()  # optional programs/modules that were not found
    features: frozenset[str] = frozenset()  # e.g. {"9p", "virtio_console"}


@dataclass(frozen=True)
class Share:
    """A host directory shared with the guest over virtio-9p."""

    host: Path
    guest: str
    readonly: bool = False
    tag: str = ""
    automount: bool = True  # False: its plugin mounts it (the build root share)
    mapped: bool = False  # owners and modes as root sets them, in xattrs (mapped9p)


@dataclass(frozen=True)
class Disk:
    """A disk image attached as a virtio block device, named stably in the guest."""

    path: Path
    name: str
    format: str = "raw"
    size: int | None = None
    readonly: bool = False

    @staticmethod
    def drive_id(index: int) -> str:
        """qemu's id of the ``index``-th disk's drive (what QMP events name)."""
        return f"hshdisk{index}"


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs: the command and where and how to run it."""

    argv: tuple[str, ...]
    cwd: str
    env: tuple[tuple[str, str], ...]
    shares: tuple[Share, ...] = ()
    disks: tuple[Disk, ...] = ()
    memory_mb: int = 512
    cpus: int = 1
    timeout: float | None = None
    accel: str = "auto"
    stdin: bool = False  # forward the host's stdin
    verbose: bool = False
    interactive: bool = False  # `hshelper shell`: a terminal on the serial console
    # The command's filesystem: "image" (the image over the build root), "root" (the
    # build root alone) or "isolated" (the image alone); see plugins/buildroot.py.
    mode: str = "image"
    # Set when the machine has a saved state's fixed shape (hshelper.qemu.savedstate):
    # the directory with the placeholders that fill the share and disk slots not used.
    slot_dir: str = ""
    extra: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def share_at(self, guest: str) -> Share | None:
        """The share the guest sees at ``guest`` (guestabi.ROOT_DIR: the build root)."""
        return next((s for s in self.shares if s.guest == guest), None)


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen for a run and why."""

    name: str  # "kvm" or "tcg"
    reason: str


@dataclass(frozen=True)
class RunResult:
    """What a run produced (hook ``hshelper_after_run``).

    ``skipped``: the command never ran (``--skip-without-kvm`` without a working KVM);
    ``status`` is then 0 and ``reason`` says why.
    """

    status: int
    reason: str  # "" when the command's own status; else why hshelper chose ``status``
    accel: Accel
    seconds: float
    boot_seconds: float | None
    console_log: Path | None
    artifacts: tuple[Path, ...] = ()
    skipped: bool = False
    start: str = "booted"  # "restored", "saved" or "booted": how the VM started
    restore_seconds: float | None = None

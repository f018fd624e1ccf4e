"""Saved VM states: a guest booted to "ready", kept on disk and restored for later runs.

A cold boot under TCG costs seconds; loading a saved state costs a fraction of one. The
guest init stops at "ready" to wait for its run script (hshelper.guestabi), before it
mounts a share or binds a disk, so a state saved there holds nothing of any one run:
the run script, the shares (9p devices present but not yet mounted) and the disks
(virtio-blk devices present, their driver not yet loaded) all arrive after the restore.

A state is a cache entry keyed by everything that makes it valid (:func:`key`): the
qemu binary and its version, the whole command line with the per-run paths taken out,
the kernel and initrd files' identities, hshelper's own code, and under KVM the host's
CPU. It is one file, the guest's RAM and then qemu's device state
(hshelper.qemu.ramfile: the RAM is mapped at restore, not loaded), written atomically
with a size+CRC record, checked before use, shared read-only by parallel runs (one of
them saves, under a lock; the others just boot), and discarded when it fails to
restore.

Uniqueness: every restore starts from the same RNG state. The machine gets a ``vmgenid``
device whose generation ID qemu renews at every incoming migration; Linux (5.18+, with
CONFIG_VMGENID and ACPI) reseeds its RNG when it changes. Machines without it (no ACPI
with a directly booted kernel: aarch64, armv7l, riscv64, ppc64le, s390x here) reseed by
themselves with hshelper.reseed's program; x86 kernels without CONFIG_VMGENID, and
kernels older than 4.17 elsewhere, never use saved states: they boot cold, always.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hshelper import cache

DISK_SLOTS = 4
SHARE_SLOTS = 4  # besides the build root's share
# Per-run values in qemu's command line: taken out of the key, which then says "a
# machine of this shape".
_RUN_SPECIFIC = re.compile(r"(fd=\d+|path=[^,]*|file=[^,]*|serial=[^,]*|"
                           r"security_model=[^,]*|format=[^,]*)")
# Per-run options that some runs give and others do not: dropped whole.
_RUN_OPTIONAL = re.compile(r",(readonly=on|fmode=[0-7]+|dmode=[0-7]+)")


@dataclass(frozen=True)
class State:
    """One saved state in the cache."""

    path: Path
    key: str

    @property
    def lock(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")


def qemu_version(qemu: str, memo_dir: Path) -> str:
    """``qemu --version``'s first line, remembered per binary identity (path, size,
    mtime) in ``memo_dir``: a state saved by another qemu would not load."""
    st = os.stat(qemu)
    ident = hashlib.sha256(f"{qemu}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / f"qemu-{ident[:16]}.version"
    with contextlib.suppress(OSError):
        return memo.read_text()
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    version = out.stdout.splitlines()[0] if out.stdout else f"unknown {st.st_size}"
    with contextlib.suppress(OSError):
        memo.write_text(version)
    return version


# The oldest qemu that can keep a state's RAM in a file: -machine memory-backend (5.0);
# x-ignore-shared came in 4.0.
MIN_QEMU = (5, 0)


def new_enough(version: str) -> bool:
    """Whether qemu's ``--version`` line names a qemu that can save states (an
    unreadable line is taken to: a state that does not load only costs a cold boot)."""
    found = re.search(r"version (\d+)\.(\d+)", version)
    return found is None or (int(found[1]), int(found[2])) >= MIN_QEMU


# The /proc/cpuinfo lines a KVM state (saved with -cpu host) depends on: the model and
# the feature flags (x86 "model name", "flags"; arm64 implementer, part, variant,
# "Features"; s390x "features" and the machine type; ppc64 "cpu" and "revision").
CPU_KEYS = ("model name", "flags", "CPU implementer", "CPU part", "CPU variant",
            "Features", "features", "processor 0", "cpu", "revision")


def cpu_identity(cpuinfo: str) -> str:
    """A digest of the first line of each of CPU_KEYS in ``cpuinfo``; "unknown" when
    there is none."""
    first: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in CPU_KEYS and key not in first:
            first[key] = value.strip()
    if not first:
        return "unknown"
    return hashlib.sha256(json.dumps(first, sort_keys=True).encode()).hexdigest()[:16]


def host_cpu() -> str:
    """The host CPU's model and flags (a KVM state holds the CPU's features)."""
    try:
        return cpu_identity(Path("/proc/cpuinfo").read_text())
    except OSError:
        return "unknown"


def file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ino]


def shape(argv: list[str]) -> list[str]:
    """The command line with the per-run values taken out."""
    return [_RUN_SPECIFIC.sub(lambda m: m.group(1).split("=")[0] + "=*",
                              _RUN_OPTIONAL.sub("", a)) for a in argv]


def key(version: str, argv: list[str], kernel: Path, initrd: Path, accel: str,
        code_digest: str) -> str:
    """The cache key of a state for this machine (``version``: :func:`qemu_version`)."""
    material = {"qemu": version, "argv": shape(argv[1:]),
                "kernel": file_identity(kernel), "initrd": file_identity(initrd),
                "code": code_digest, "cpu": host_cpu() if accel == "kvm" else ""}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def entry(states_dir: Path, state_key: str) -> State:
    return State(states_dir / f"{state_key}.state", state_key)


def usable(state: State) -> str | None:
    """Why ``state`` cannot be restored (None: it can): missing, or damaged (and then
    removed)."""
    if not state.path.exists():
        return "no saved state"
    problem = cache.damage(state.path)
    if problem:
        discard(state)
        return f"the saved state was damaged ({problem}) and was removed"
    return None


def discard(state: State) -> None:
    cache.discard(state.path)


@dataclass
class Saving:
    """Where to save (None: another run is saving this state right now, so this one
    does not), and whether the saved file is to be kept."""

    path: Path | None
    keep: bool = False
    crc: int | None = None  # the file's CRC-32, computed as it was written


@contextlib.contextmanager
def saving(state: State):
    """Yield a :class:`Saving`; the file is renamed into place with its record only
    when the block ends with ``keep`` set, and removed otherwise."""
    state.path.parent.mkdir(parents=True, exist_ok=True)
    with open(state.lock, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield Saving(None)
            return
        slot = Saving(state.path.with_name(f".{state.path.name}.{os.getpid()}"))
        try:
            yield slot
            if slot.keep:
                os.replace(slot.path, state.path)
                cache.record(state.path, slot.crc)
        finally:
            with contextlib.suppress(FileNotFoundError):
                slot.path.unlink()


def placeholder(states_dir: Path) -> Path:
    """An empty 1 MiB raw disk that fills the disk slots nobody uses."""
    path = states_dir / "placeholder.img"
    if not path.exists() or path.stat().st_size != 1 << 20:
        states_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".placeholder.{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.truncate(1 << 20)
        os.replace(tmp, path)
    return path


def empty_dir(states_dir: Path) -> Path:
    """An empty directory that backs the share slots nobody uses (never mounted)."""
    path = states_dir / "empty"
    path.mkdir(parents=True, exist_ok=True)
    return path

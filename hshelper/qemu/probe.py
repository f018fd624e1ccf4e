"""Probing KVM for real: does a guest actually run under it?

A /dev/kvm that exists and opens is not proof: a broken KVM (nested virtualisation gone
wrong, as on some CI machines) accepts the guest and then never runs it. Two probes, the
machine table says which (``kvm_probe``):

- ``firmware`` (x86): a 64 KiB firmware blob (probe.S) that switches to protected and
  then long mode, as a kernel does first, and writes one byte to qemu's isa-debug-exit
  port; qemu then exits with status (byte << 1) | 1. (The KVM on our CI machine runs
  real-mode code fine and hangs at the switch to protected mode, so a real-mode-only
  probe would lie.) Well under a second on working KVM.
- ``kernel`` (every other architecture): the build root's own kernel booted with no
  initrd and ``panic=-1``: it runs until it finds no root filesystem, panics, reboots,
  and ``-no-reboot`` turns that into qemu's exit 0. About a second under KVM.

Anything else within the timeout means KVM is not usable, and the reason says why. KVM
also needs the host's architecture: an aarch64 guest on an x86_64 host is TCG's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hshelper.qemu.machines import Machine, lookup

KVM_DEVICE = "/dev/kvm"
EXIT_PORT = 0xF4
EXIT_BYTE = 0x31
EXPECTED_STATUS = (EXIT_BYTE << 1) | 1
BIOS_SIZE = 64 * 1024
RESET_VECTOR = BIOS_SIZE - 16  # 0xFFFF0 in real mode


@dataclass(frozen=True)
class Probe:
    usable: bool
    reason: str


# Assembled from probe.S (beside this file): real mode -> protected mode -> long mode,
# then "out 0xf4, 0x31". Loaded at 0xFE00 of the 64 KiB BIOS image.
PROBE_CODE = bytes.fromhex(
    "fab800f08ed8660f0116c0fe0f20c00c010f22c066ea1cfe0f00080066b81000"
    "8ed88ec08ed0c7050010000003200000c7050410000000000000c70500200000"
    "03300000c7050420000000000000c7050030000083000000c705043000000000"
    "0000b8001000000f22d80f20e083c8200f22e0b9800000c00f320d000100000f"
    "300f20c00d000000800f22c0ea93fe0f001800b031e6f4f4ebfd8db400006690"
    "0000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf00"
    "1f00a0fe0f00")
CODE_AT = 0xFE00
RESET_JUMP = bytes.fromhex("e90dfe")  # jmp CODE_AT, at the reset vector


def probe_firmware() -> bytes:
    """The 64 KiB firmware image qemu loads with -bios for the probe."""
    blob = bytearray(BIOS_SIZE)
    blob[CODE_AT:CODE_AT + len(PROBE_CODE)] = PROBE_CODE
    blob[RESET_VECTOR:] = RESET_JUMP + b"\xf4" * (16 - len(RESET_JUMP))
    return bytes(blob)


def firmware_argv(qemu: str, machine: Machine, firmware: str, accel: str = "kvm",
                  extra: Sequence[str] = ()) -> list[str]:
    """The x86 firmware probe's command line."""
    return [qemu, *extra, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"{machine.machine_for(accel)},accel={accel}", "-m", "16",
            "-bios", firmware, "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1"]


def kernel_argv(qemu: str, machine: Machine, kernel: Path, accel: str = "kvm",
                extra: Sequence[str] = ()) -> list[str]:
    """The kernel probe's command line: no initrd, no root, a panic, a reboot, an exit."""
    return [qemu, *extra, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"{machine.machine_for(accel)},accel={accel}",
            "-cpu", machine.cpu_for(accel), "-m", "128", "-no-reboot",
            "-kernel", str(kernel), "-append", "panic=-1 loglevel=0"]


def same_architecture(machine: Machine) -> str | None:
    """Why KVM cannot run this machine's guests here (None: it could)."""
    try:
        host = lookup(os.uname().machine)
    except Exception:  # noqa: BLE001 - an unknown host architecture
        return f"the host's architecture {os.uname().machine} has no helper VM row"
    if host.qemu != machine.qemu:
        return (f"KVM runs guests of the host's architecture ({host.arch}); this guest is "
                f"{machine.arch}")
    return None


def device_problem(path: str = KVM_DEVICE) -> str | None:
    """Why /dev/kvm cannot be used by this process, with the fix; None when it can."""
    try:
        os.stat(path)
    except PermissionError:
        return f"{path} cannot be reached by uid {os.getuid()} (a directory above it is closed)"
    except OSError:
        return (f"{path} does not exist (no KVM on this machine, or the build root does not "
                f"have it: hasher: hsh --mountpoints=/dev/kvm with allowed_mountpoints in "
                f"hasher-priv; mock: config_opts['plugin_conf']['hshelper_opts']['kvm'] = "
                f"True; sbuild: the chroot-setup script in "
                f"/usr/share/hshelper/integrations/sbuild)")
    if not os.access(path, os.R_OK | os.W_OK):
        return (f"{path} is not readable and writable by uid {os.getuid()} "
                f"(add the build user to the kvm group or give it access to {path})")
    return None


def _run(argv: list[str], accel: str, timeout: float, expected: int, what: str) -> Probe:
    """Run a probe guest; usable only if qemu exits with ``expected`` in time."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        return Probe(False, f"cannot start {argv[0]}: {exc.strerror}")
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Probe(False, f"a probe guest ({what}) under {accel} did not finish within "
                            f"{timeout:g} s ({accel} is present but broken)")
    took = time.monotonic() - started
    if proc.returncode == expected:
        return Probe(True, f"a probe guest ({what}) ran under {accel} in {took:.2f} s")
    lines = err.decode(errors="replace").strip().splitlines()
    why = lines[-1] if lines else f"exit status {proc.returncode}"
    return Probe(False, f"a probe guest ({what}) under {accel} failed: {why}")


def run_probe(qemu: str, machine: Machine, kernel: Path | None, accel: str, timeout: float,
              extra: Sequence[str] = ()) -> Probe:
    """Boot the machine's probe guest under ``accel``."""
    if machine.kvm_probe == "kernel":
        if kernel is None:
            return Probe(False, "no kernel to probe with")
        # A whole kernel boot: give it more time than the firmware's few instructions.
        return _run(kernel_argv(qemu, machine, kernel, accel, extra), accel, timeout * 3, 0,
                    "the kernel to its no-root panic")
    import tempfile  # only a probe needs it

    fd, firmware = tempfile.mkstemp(prefix="hshelper-probe-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(probe_firmware())
        return _run(firmware_argv(qemu, machine, firmware, accel, extra), accel, timeout,
                    EXPECTED_STATUS, "64 KiB firmware to long mode")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(firmware)


def probe_kvm(qemu: str, machine: Machine, kernel: Path | None = None, timeout: float = 3.0,
              device: str = KVM_DEVICE) -> Probe:
    """Whether KVM really runs this machine's guests for this process, and why."""
    problem = same_architecture(machine) or device_problem(device)
    if problem:
        return Probe(False, problem)
    return run_probe(qemu, machine, kernel, "kvm", timeout)

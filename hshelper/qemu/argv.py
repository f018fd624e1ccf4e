"""qemu's command line for a helper VM: a pure function of the machine row, what to
boot, the inherited descriptors and the plugins' devices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hshelper.guestabi import PORT_PREFIX, PORTS
from hshelper.qemu.machines import Machine


@dataclass(frozen=True)
class BootSpec:
    """What qemu boots, with which accelerator and sizes."""

    accel: str  # "kvm" or "tcg"
    memory_mb: int
    cpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    tcg_cpu: str = ""  # overrides the machine row's CPU model under TCG

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb << 20


def qemu_argv(qemu: str, machine: Machine, boot: BootSpec, fds: dict[str, int],
              devices: list[str]) -> list[str]:
    """The qemu command line. ``fds`` maps "console", "qmp" and each guest ABI port to
    the descriptor qemu inherits for it (socketpairs: nothing on disk); ``devices`` are
    the plugins' arguments (shares, disks)."""
    argv = [
        qemu,
        "-nodefaults", "-no-user-config",  # only what we ask for, no ~/.config surprises
        "-display", "none",
        "-machine", f"{machine.machine_for(boot.accel)},accel={boot.accel}",
        "-cpu", machine.cpu_for(boot.accel, boot.tcg_cpu),
        "-m", str(boot.memory_mb),
        "-smp", str(boot.cpus),
        "-no-reboot",  # the guest's reboot request is how it stops
        "-nic", "none",  # no network unless a plugin adds one
        # A saved state then carries no run state: a restored VM runs as soon as it is
        # loaded (a RESUME event), with no "cont" round trip.
        "-global", "migration.store-global-state=off",
        "-kernel", str(boot.kernel),
        "-initrd", str(boot.initrd),
        "-append", boot.cmdline,
        "-chardev", f"socket,id=console,fd={fds['console']}",
        "-serial", "chardev:console",
        # The control channel: qemu's own events (I/O errors, pauses, panics, shutdown
        # causes) as JSON instead of guesses from console text.
        "-chardev", f"socket,id=hshqmp,fd={fds['qmp']}",
        "-mon", "chardev=hshqmp,mode=control",
        "-device", f"{machine.device('virtio-serial')},id=hshser",
    ]
    for port in PORTS:
        argv += ["-chardev", f"socket,id=hsh{port},fd={fds[port]}",
                 "-device", f"virtserialport,bus=hshser.0,chardev=hsh{port},"
                            f"name={PORT_PREFIX}{port}"]
    if machine.pvpanic:
        argv += ["-device", machine.pvpanic]  # a guest panic becomes a QMP event
    return argv + list(devices)


RAM_ID = "hshram"


def ram_backend(memory_mb: int, path: str, shared: bool) -> list[str]:
    """Guest RAM in a file: shared (the saving VM: its memory is the file, which
    becomes the saved state's RAM) or private (a restored VM: the saved RAM mapped
    copy-on-write, so loading copies nothing and the file never changes)."""
    return ["-object", f"memory-backend-file,id={RAM_ID},size={memory_mb}M,"
                       f"mem-path={path},share={'on' if shared else 'off'}",
            "-machine", f"memory-backend={RAM_ID}"]

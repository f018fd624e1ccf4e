"""The machine table: everything that differs between guest architectures, as data.

One row per architecture, read whole in one screen. Nothing else in hshelper names an
architecture: the qemu command line, the KVM probe, the kernel image handling, the
guest's boot modules and the image recipes all look their differences up here.

The guest's architecture is the build root's (its kernel modules say, else its shell),
never the host's: an arm64 build root on an x86_64 builder (through qemu-user) gets an
aarch64 guest under TCG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hshelper.errors import HshelperError

SLOT_BASE = 0x10  # the first disk slot's PCI slot or channel device number

# ELF e_machine numbers (elf.h).
EM_386, EM_ARM, EM_PPC64, EM_S390, EM_X86_64, EM_AARCH64, EM_RISCV = 3, 40, 21, 22, 62, 183, 243


@dataclass(frozen=True)
class Machine:
    """How qemu runs a helper VM of one architecture.

    ``machine_tcg``/``machine_kvm``: qemu's ``-machine`` value without ``accel=``.
    ``console``: the kernel's ``console=`` device for qemu's first serial port (on every
    machine here ``-serial`` attaches to the board's own UART or console).
    ``transport``: the virtio transport suffix (``virtio-blk-pci``, ``virtio-blk-ccw``);
    ``transport_modules``: what the guest loads at boot so the devices appear.
    ``kernel_format``: how distros ship the kernel (see hshelper.qemu.kernelfmt).
    ``kvm_probe``: ``firmware`` (a 64 KiB blob that switches to long mode, x86 only) or
    ``kernel`` (the build root's kernel booted to its no-root panic).
    ``elf``: (e_machine, ELF class, little endian) of the architecture's binaries.
    """

    arch: str
    aliases: tuple[str, ...]
    elf: tuple[int, int, bool]
    qemu: str
    machine_tcg: str
    machine_kvm: str
    tcg_cpu: str
    console: str
    transport: str
    transport_modules: tuple[str, ...]
    kernel_format: str
    kvm_probe: str
    pvpanic: str | None  # qemu's panic-notifier device, and below the guest's driver
    max_cpus: int
    gpt_root_type: str
    efi_boot_file: str | None
    kernel_packages: dict[str, str] = field(default_factory=dict, compare=False)
    qemu_packages: dict[str, str] = field(default_factory=dict, compare=False)
    cmdline: tuple[str, ...] = ()
    kvm_cpu: str = "host"
    pvpanic_module: str = ""
    # qemu's vmgenid reaches the kernel (ACPI); without it a restored guest reseeds its
    # RNG by itself (hshelper.reseed)
    vmgenid: bool = False
    # What goes wrong in a restored guest of this machine (empty: nothing known); such
    # a machine always boots. With QEMU 7.2's TCG: ppc64le and riscv64 guests never get
    # another timer interrupt (they idle in their cpuidle loop; `sleep 1` never returns,
    # nor does sfdisk's table re-read); s390x guests restored from some states (saved
    # while a device interrupt was still pending) never see a device's interrupts again
    # (the first 9p request is answered and signalled, and the mount waits forever).
    restore_fault: str = ""
    why: str = ""  # the reasoning behind the less obvious choices, for `hshelper info`

    @property
    def restores(self) -> bool:
        """Whether guests of this machine may start from a saved state."""
        return not self.restore_fault

    def device(self, kind: str) -> str:
        """The qemu device for a virtio ``kind`` on this transport (virtio-blk-ccw)."""
        return f"{kind}-{self.transport}"

    def slot(self, index: int) -> tuple[str, str]:
        """Disk slot ``index``'s fixed address: (qemu device property, sysfs glob of
        the virtio device behind it), so the guest binds exactly the disks of a run
        whatever else the machine has (a saved one has placeholder slots)."""
        number = SLOT_BASE + index
        if self.transport == "ccw":
            return f"devno=fe.0.{number:04x}", f"/sys/bus/ccw/devices/0.0.{number:04x}/virtio*"
        return f"addr={number:#x}", f"/sys/bus/pci/devices/*:00:{number:02x}.0/virtio*"

    def machine_for(self, accel: str) -> str:
        return self.machine_kvm if accel == "kvm" else self.machine_tcg

    def cpu_for(self, accel: str, tcg_override: str = "") -> str:
        return self.kvm_cpu if accel == "kvm" else (tcg_override or self.tcg_cpu)


_KERNEL_X86 = {"debian": "linux-image-amd64", "fedora": "kernel-core",
               "altlinux": "kernel-image-un-def"}
_QEMU_X86 = {"debian": "qemu-system-x86", "fedora": "qemu-system-x86-core",
             "altlinux": "qemu-system-x86-core"}

MACHINES: dict[str, Machine] = {m.arch: m for m in (
    Machine(
        arch="x86_64", aliases=("amd64", "x86-64", "x64"), elf=(EM_X86_64, 64, True),
        qemu="qemu-system-x86_64", machine_tcg="pc", machine_kvm="pc",
        # No `rep movsb` (ERMS/FSRM): TCG emulates it slowly, and without them the guest
        # kernel and glibc copy with vector loops (boot 0.4 s sooner, copies ~1.8x).
        tcg_cpu="max,erms=off,fsrm=off",
        console="ttyS0", transport="pci", transport_modules=("virtio_pci",),
        kernel_format="x86", kvm_probe="firmware", pvpanic="pvpanic", max_cpus=255,
        gpt_root_type="4f68bce3-e8cd-4db1-96e7-fbcaf984b709", efi_boot_file="BOOTX64.EFI",
        kernel_packages=_KERNEL_X86, qemu_packages=_QEMU_X86,
        # Probing absent UARTs costs time; the IO-APIC timer check fails when TCG runs
        # on a busy host ("IO-APIC + timer doesn't work!" panics): skip it, as cloud
        # images do.
        cmdline=("8250.nr_uarts=1", "no_timer_check"),
        pvpanic_module="pvpanic_mmio",  # the ISA device is found through ACPI
        vmgenid=True,
        why="pc board: the fewest devices to probe; the unpacked PVH vmlinux under TCG"),
    Machine(
        arch="i686", aliases=("i386", "i486", "i586", "x86"), elf=(EM_386, 32, True),
        # qemu-system-x86_64 runs 32-bit kernels too, and a 32-bit root's 64-bit one.
        qemu="qemu-system-x86_64", machine_tcg="pc", machine_kvm="pc", tcg_cpu="max",
        console="ttyS0", transport="pci", transport_modules=("virtio_pci",),
        kernel_format="x86", kvm_probe="firmware", pvpanic="pvpanic", max_cpus=255,
        gpt_root_type="44479540-f297-41b2-9af7-d131d5f0458a", efi_boot_file="BOOTIA32.EFI",
        kernel_packages={"debian": "linux-image-686", "altlinux": "kernel-image-un-def"},
        qemu_packages=_QEMU_X86, cmdline=("8250.nr_uarts=1", "no_timer_check"),
        vmgenid=True),
    Machine(
        arch="aarch64", aliases=("arm64", "armv8"), elf=(EM_AARCH64, 64, True),
        qemu="qemu-system-aarch64", machine_tcg="virt", machine_kvm="virt,gic-version=host",
        # The emulated pointer authentication of `max` makes every function call costly:
        # a 6.1 kernel boots in 13-15 s with `max`, about 3 s with pauth off.
        tcg_cpu="max,pauth=off",
        console="ttyAMA0", transport="pci", transport_modules=("virtio_pci",),
        kernel_format="arm64", kvm_probe="kernel", pvpanic="pvpanic-pci", max_cpus=8,
        gpt_root_type="b921b045-1df0-41c3-af44-4c6f280d3fae", efi_boot_file="BOOTAA64.EFI",
        kernel_packages={"debian": "linux-image-arm64", "fedora": "kernel-core",
                         "altlinux": "kernel-image-un-def"},
        qemu_packages={"debian": "qemu-system-arm", "fedora": "qemu-system-aarch64-core",
                       "altlinux": "qemu-system-aarch64-core"},
        pvpanic_module="pvpanic_pci",
        why="virt board (GICv2 under TCG: less to emulate); -cpu max without pointer "
            "authentication, which TCG emulates slowly"),
    Machine(
        arch="armv7l", aliases=("armhf", "armv7", "armv7hl", "arm"), elf=(EM_ARM, 32, True),
        qemu="qemu-system-arm", machine_tcg="virt,highmem=off", machine_kvm="virt",
        tcg_cpu="cortex-a15", console="ttyAMA0", transport="pci",
        transport_modules=("virtio_pci",), kernel_format="arm", kvm_probe="kernel",
        pvpanic=None, max_cpus=8, gpt_root_type="69dad710-2ce4-4e3c-b16c-21a1d49abed3",
        efi_boot_file="BOOTARM.EFI",
        kernel_packages={"debian": "linux-image-armmp-lpae"},
        qemu_packages={"debian": "qemu-system-arm"}),
    Machine(
        arch="riscv64", aliases=("riscv", "rv64"), elf=(EM_RISCV, 64, True),
        qemu="qemu-system-riscv64", machine_tcg="virt", machine_kvm="virt",
        tcg_cpu="rv64", console="ttyS0", transport="pci",
        transport_modules=("virtio_pci",), kernel_format="riscv", kvm_probe="kernel",
        pvpanic="pvpanic-pci", max_cpus=8,
        restore_fault="gets no timer interrupts under QEMU 7.2's TCG",
        gpt_root_type="72ec70a6-cf74-40e6-bd49-4bda08e8f224", efi_boot_file="BOOTRISCV64.EFI",
        kernel_packages={"debian": "linux-image-riscv64", "fedora": "kernel-core"},
        qemu_packages={"debian": "qemu-system-misc", "fedora": "qemu-system-riscv-core"},
        pvpanic_module="pvpanic_pci",
        why="virt board with OpenSBI, qemu's default firmware"),
    Machine(
        arch="ppc64le", aliases=("ppc64el", "powerpc64le"), elf=(EM_PPC64, 64, True),
        qemu="qemu-system-ppc64",
        # TCG cannot provide the Spectre mitigations pseries asks for by default; saying
        # "broken" up front keeps qemu from warning about each one.
        machine_tcg="pseries,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
                    "cap-ccf-assist=off",
        machine_kvm="pseries,x-vof=on", tcg_cpu="power9", console="hvc0", transport="pci",
        transport_modules=("virtio_pci",), kernel_format="elf", kvm_probe="kernel",
        pvpanic=None, max_cpus=8, gpt_root_type="c31c45e6-3f39-412e-80fb-4809c4980599",
        efi_boot_file=None,
        restore_fault="gets no timer interrupts under QEMU 7.2's TCG",
        kernel_packages={"debian": "linux-image-powerpc64le", "fedora": "kernel-core"},
        qemu_packages={"debian": "qemu-system-ppc", "fedora": "qemu-system-ppc-core"},
        why="pseries with qemu's Virtual Open Firmware instead of SLOF (boot to the init "
            "1.9 s instead of 6.7 s under TCG); the console is the hypervisor's terminal"),
    Machine(
        arch="s390x", aliases=("s390",), elf=(EM_S390, 64, False),
        qemu="qemu-system-s390x", machine_tcg="s390-ccw-virtio", machine_kvm="s390-ccw-virtio",
        tcg_cpu="max", console="ttysclp0", transport="ccw",
        transport_modules=("virtio_ccw?",), kernel_format="s390", kvm_probe="kernel",
        pvpanic=None, max_cpus=8, gpt_root_type="5eead9a9-fe09-4a1e-a1d7-520d00531306",
        efi_boot_file=None,
        restore_fault="can miss its devices' interrupts under QEMU 7.2's TCG",
        kernel_packages={"debian": "linux-image-s390x", "fedora": "kernel-core"},
        qemu_packages={"debian": "qemu-system-misc", "fedora": "qemu-system-s390x-core"},
        why="s390-ccw-virtio: virtio devices on the channel subsystem (-ccw), the SCLP "
            "console"),
)}


def lookup(name: str) -> Machine:
    """The row for an architecture name as uname, Debian, RPM or qemu spell it."""
    for machine in MACHINES.values():
        if name == machine.arch or name in machine.aliases:
            return machine
    raise HshelperError(f"no helper VM for architecture {name} "
                        f"(known: {', '.join(MACHINES)})")


def host() -> Machine:
    return lookup(os.uname().machine)


def from_elf(e_machine: int, elf_class: int, little_endian: bool) -> Machine | None:
    """The row whose binaries carry these ELF header fields."""
    for machine in MACHINES.values():
        if machine.elf == (e_machine, elf_class, little_endian):
            return machine
    return None


@dataclass(frozen=True)
class Choice:
    """The machine for a run and why it is that one."""

    machine: Machine
    reason: str


def boot_modules(machine: Machine) -> tuple[str, ...]:
    """The guest's boot modules for this machine, in kernel-modules.lst syntax (every
    one optional: a kernel may have them built in)."""
    names = [m.rstrip("?") for m in machine.transport_modules]
    if machine.pvpanic_module:
        names.append(machine.pvpanic_module)
    return tuple(f"{name}?!" for name in names)

"""The machine table and the qemu command line built from it: every row names things
that the installed qemu really has, and the argv for each architecture is what qemu
accepts (checked by qemu itself, without booting anything)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hshelper import core, runcmd
from hshelper.config import Config, Layer
from hshelper.errors import HshelperError
from hshelper.guestabi import PORTS
from hshelper.qemu import machines
from hshelper.qemu.argv import BootSpec, qemu_argv, ram_backend

ROWS = list(machines.MACHINES.values())


def _qemu(row: machines.Machine) -> str:
    path = shutil.which(row.qemu)
    if path is None:
        pytest.skip(f"{row.qemu} is not installed here")
    return path


@pytest.mark.parametrize("row", ROWS, ids=[r.arch for r in ROWS])
def test_row_names_what_qemu_has(row):
    qemu = _qemu(row)
    machine_type = row.machine_tcg.split(",")[0]
    types = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True,
                           check=True).stdout
    assert any(line.split()[:1] == [machine_type] for line in types.splitlines())
    cpus = subprocess.run([qemu, "-machine", machine_type, "-cpu", "help"],
                          capture_output=True, text=True, check=True).stdout
    model = row.tcg_cpu.split(",")[0]
    assert model in cpus.split(), f"{model} not among {row.qemu}'s CPU models"
    devices = subprocess.run([qemu, "-machine", machine_type, "-device", "help"],
                             capture_output=True, text=True, check=True).stdout
    for kind in ("virtio-serial", "virtio-blk", "virtio-9p"):
        assert f'"{row.device(kind)}"' in devices
    if row.pvpanic:
        assert f'"{row.pvpanic}"' in devices


@pytest.mark.parametrize("row", ROWS, ids=[r.arch for r in ROWS])
def test_argv_is_accepted_by_qemu(row, tmp_path):
    """qemu parses the whole command line and builds the machine (devices, chardevs,
    CPU properties) before it would load the kernel: a missing kernel file is then the
    first and only complaint."""
    qemu = _qemu(row)
    boot = BootSpec("tcg", 256, 1, tmp_path / "no-kernel", tmp_path / "no-initrd", "quiet")
    fds = {name: 0 for name in ("console", "qmp", *PORTS)}
    argv = qemu_argv(qemu, row, boot, fds, [])
    # fd 0 for every socket chardev would be refused; null chardevs stand in for them.
    argv = [a if not a.startswith("socket,id=") else "null," + a.split(",")[1]
            for a in argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "no-kernel" in out.stderr, out.stderr


@pytest.mark.parametrize("shared", [True, False], ids=["saving", "restored"])
@pytest.mark.parametrize("row", ROWS, ids=[r.arch for r in ROWS])
def test_every_machine_takes_its_ram_from_a_file(row, shared, tmp_path):
    """A saved state's RAM is a file (hshelper.qemu.ramfile): every machine accepts
    it as its memory backend, shared while saving and private when restored."""
    qemu = _qemu(row)
    ram = tmp_path / "ram"
    with open(ram, "wb") as fh:
        fh.truncate(256 << 20)
    boot = BootSpec("tcg", 256, 1, tmp_path / "no-kernel", tmp_path / "no-initrd", "quiet")
    argv = [qemu, "-nodefaults", "-display", "none",
            "-machine", row.machine_for("tcg"), "-m", "256",
            *ram_backend(256, str(ram), shared), "-kernel", str(boot.kernel)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert "no-kernel" in out.stderr, out.stderr
    assert ram.stat().st_size == 256 << 20


def test_argv_per_architecture_uses_its_transport_and_console():
    boot = BootSpec("tcg", 256, 1, Path("/k"), Path("/i"), "console=X")
    fds = {name: 3 for name in ("console", "qmp", *PORTS)}
    s390 = qemu_argv("q", machines.lookup("s390x"), boot, fds, [])
    assert "virtio-serial-ccw,id=hshser" in s390 and "s390-ccw-virtio,accel=tcg" in s390
    arm = qemu_argv("q", machines.lookup("arm64"), boot, fds, [])
    assert "max,pauth=off" in arm and "virt,accel=tcg" in arm
    kvm = qemu_argv("q", machines.lookup("arm64"), BootSpec("kvm", 256, 1, Path("/k"),
                                                              Path("/i"), ""), fds, [])
    assert "virt,gic-version=host,accel=kvm" in kvm and kvm[kvm.index("-cpu") + 1] == "host"
    override = BootSpec("tcg", 256, 1, Path("/k"), Path("/i"), "", tcg_cpu="cortex-a57")
    assert "cortex-a57" in qemu_argv("q", machines.lookup("aarch64"), override, fds, [])


@pytest.mark.parametrize("name, arch", [("amd64", "x86_64"), ("arm64", "aarch64"),
                                        ("ppc64el", "ppc64le"), ("s390x", "s390x"),
                                        ("riscv64", "riscv64"), ("armhf", "armv7l")])
def test_lookup_by_any_spelling(name, arch):
    assert machines.lookup(name).arch == arch


def test_unknown_architecture_is_an_error():
    with pytest.raises(HshelperError, match="no helper VM for architecture mips"):
        machines.lookup("mips")


def test_from_elf_tells_endianness_and_class_apart():
    assert machines.from_elf(machines.EM_PPC64, 64, True).arch == "ppc64le"
    assert machines.from_elf(machines.EM_PPC64, 64, False) is None  # big-endian ppc64
    assert machines.from_elf(machines.EM_S390, 64, False).arch == "s390x"
    assert machines.from_elf(machines.EM_X86_64, 64, True).arch == "x86_64"


def test_boot_modules_are_optional_boot_entries():
    assert machines.boot_modules(machines.lookup("x86_64")) == ("virtio_pci?!",
                                                                "pvpanic_mmio?!")
    assert machines.boot_modules(machines.lookup("s390x")) == ("virtio_ccw?!",)


def test_saved_state_key_ignores_per_run_values_only():
    from hshelper.qemu.savedstate import shape

    a = ["-chardev", "socket,id=console,fd=4", "-fsdev",
         "local,id=hsh0,path=/a,security_model=mapped-xattr,fmode=0644,dmode=0755",
         "-drive", "file=/x.img,if=none,id=hshdisk0,format=raw,readonly=on", "-m", "512"]
    b = ["-chardev", "socket,id=console,fd=9", "-fsdev",
         "local,id=hsh0,path=/b,security_model=none",
         "-drive", "file=/y.qcow2,if=none,id=hshdisk0,format=qcow2", "-m", "512"]
    assert shape(a) == shape(b)
    assert shape(a) != shape([*b[:-1], "384"])  # memory is the machine's shape
    assert shape(["-device", "virtio-blk-pci,drive=hshdisk0,serial=out,addr=0x10"]) == \
        shape(["-device", "virtio-blk-pci,drive=hshdisk0,serial=unused0,addr=0x10"])


# Saved VM states per machine and kernel: restores must never share an RNG state.
@pytest.mark.parametrize("arch, version, kconfig, why", [
    ("x86_64", "6.1.0-13-amd64", {"CONFIG_VMGENID": "y"}, None),
    ("x86_64", "5.10.0-28-amd64", {"CONFIG_ACPI": "y"}, "no CONFIG_VMGENID"),
    ("aarch64", "6.1.0-13-arm64", {}, None),
    ("s390x", "6.12.9-s390x", {"CONFIG_VMGENID": "y"}, "miss its devices' interrupts"),
    ("armv7l", "4.14.0-1", {}, "older than 4.17"),
    ("riscv64", "6.12.9-riscv64", {}, "no timer interrupts"),
    ("ppc64le", "6.1.0-13-powerpc64le", {}, "no timer interrupts"),
])
def test_restores_are_unsafe_without_a_reseed(arch, version, kconfig, why):
    got = runcmd.restores_unsafe(machines.lookup(arch), version, kconfig)
    assert (got is None) if why is None else (why in got)


def test_info_says_how_saved_states_go_per_machine():
    on = Config(core.hshelper_config_keys(), [])
    off = Config(core.hshelper_config_keys(), [Layer("test", {"run.saved_states": False})])
    assert "through vmgenid" in runcmd.states_line(on, machines.lookup("x86_64"), "6.1.0",
                                                   {"CONFIG_VMGENID": "y"})
    ppc = runcmd.states_line(on, machines.lookup("ppc64le"), "6.1.0", {})
    assert ppc.startswith("never (a restored ppc64le guest gets no timer interrupts")
    assert "RNDRESEEDCRNG" in runcmd.states_line(on, machines.lookup("aarch64"), "6.1.0", {})
    assert runcmd.states_line(on, machines.lookup("aarch64"), "6.1.0", {}).startswith("on:")
    assert runcmd.states_line(off, machines.lookup("aarch64"), "6.1.0", {}).startswith("off")
    assert runcmd.states_line(on, machines.lookup("x86_64"), "6.1.0", {"X": "y"}).startswith(
        "never (the kernel has no CONFIG_VMGENID)")


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
cpu MHz\t\t: 2200.000
flags\t\t: fpu vme de pse avx2 avx512f
processor\t: 1
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
cpu MHz\t\t: 2199.998
flags\t\t: fpu vme de pse avx2 avx512f
"""


def test_a_kvm_state_is_keyed_by_the_cpus_model_and_flags():
    from hshelper.qemu.savedstate import cpu_identity
    base = cpu_identity(X86_CPUINFO)
    # The same model with a feature masked (another host, a hypervisor change): another
    # state, since the guest saved with -cpu host may use that feature.
    assert cpu_identity(X86_CPUINFO.replace(" avx512f", "")) != base
    assert cpu_identity(X86_CPUINFO.replace("2.20GHz", "2.60GHz")) != base
    # What changes from moment to moment is not part of it.
    assert cpu_identity(X86_CPUINFO.replace("2200.000", "1800.123")) == base
    arm = "processor\t: 0\nFeatures\t: fp asimd aes\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert cpu_identity(arm) != cpu_identity(arm.replace(" aes", ""))
    assert cpu_identity("nothing here\n") == "unknown"

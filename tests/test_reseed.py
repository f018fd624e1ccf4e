"""The guest's RNG reseed program (hshelper/reseed.py), run for real: each architecture's
ELF under the host's qemu-user, whose ioctl reaches the host kernel's /dev/urandom."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hshelper import elf, reseed
from hshelper.qemu import machines

QEMU_USER = {"aarch64": "qemu-aarch64-static", "armv7l": "qemu-arm-static",
             "riscv64": "qemu-riscv64-static", "ppc64le": "qemu-ppc64le-static",
             "s390x": "qemu-s390x-static"}


def test_every_machine_without_vmgenid_can_reseed():
    # Otherwise its restores would share one RNG state, and it could never use them.
    assert {m.arch for m in machines.MACHINES.values() if not m.vmgenid} == set(reseed.CODE)
    assert set(QEMU_USER) == set(reseed.CODE)


@pytest.mark.parametrize("arch", sorted(reseed.CODE))
def test_the_program_is_a_static_elf_of_its_machine(arch):
    # Read back by hshelper's own ELF reader, as the guest architecture is detected.
    info = elf.parse_elf(reseed.program(arch))
    assert info is not None and info.interp is None and info.needed == ()
    assert machines.from_elf(info.machine, info.elf_class, info.little_endian) is \
        machines.MACHINES[arch]


@pytest.mark.parametrize("arch", sorted(reseed.CODE))
def test_it_reseeds_as_root_and_fails_otherwise(arch, tmp_path):
    """Its exit status is the ioctl's: 0 only when the kernel did reseed."""
    qemu = shutil.which(QEMU_USER[arch])
    if qemu is None:
        pytest.skip(f"{QEMU_USER[arch]} is not installed (qemu-user-static)")
    path = tmp_path / arch
    path.write_bytes(reseed.program(arch))
    path.chmod(0o755)
    tmp_path.chmod(0o755)

    def run(stdin: str, *prefix: str) -> int:
        with open(stdin) as fd:
            return subprocess.run([*prefix, qemu, str(path)], stdin=fd, timeout=60).returncode

    assert run("/dev/urandom") == 0
    # Not root: EPERM; not a random device: ENOTTY. Either way a failure, never 0.
    assert run("/dev/urandom", "setpriv", "--reuid=65534", "--regid=65534",
               "--clear-groups") != 0
    assert run("/dev/null") != 0


@pytest.mark.parametrize("version, has", [
    ("6.1.0-13-arm64", True), ("4.17.0", True), ("4.16.18-1", False),
    ("3.10.0-1160.el7.aarch64", False), ("6.12.117+deb13-riscv64", True), ("", False)])
def test_kernel_versions(version, has):
    assert reseed.kernel_has_it(version) is has

"""The broken-KVM guarantee, for real: this machine's /dev/kvm accepts guests and never
runs them. With that device in a build root, a run probes it, falls back to TCG with the
probe's reason, caches the answer for the machine's boot, and a run that demands KVM
fails with 125 and that reason."""

from __future__ import annotations

import os
import shutil
import stat
import time

import chroot
import pytest

from hshelper.qemu import machines, probe

pytestmark = [pytest.mark.slow, pytest.mark.vm]
QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture(scope="module")
def host_kvm():
    """Skip unless this machine has a /dev/kvm whose guests do not run."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine: the broken-KVM path cannot be shown")
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    answer = probe.probe_kvm(QEMU, machines.lookup("x86_64"), timeout=3.0)
    if answer.usable:
        pytest.skip(f"KVM works on this machine ({answer.reason}): nothing broken to see")
    return answer


@pytest.fixture
def kvm_root(root, host_kvm):
    """The bookworm root with a /dev/kvm the build user may open (its own device node
    for the same device, so the host's node keeps its modes), and no cached answer."""
    node = root / "dev/kvm"
    if os.path.lexists(node):
        node.unlink()
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(10, 232))
    node.chmod(0o666)
    shutil.rmtree(root / "home/builder/.cache/hshelper/probe", ignore_errors=True)
    try:
        yield root
    finally:
        node.unlink()
        shutil.rmtree(root / "home/builder/.cache/hshelper/probe", ignore_errors=True)


def test_a_broken_kvm_is_probed_cached_and_never_trusted(kvm_root):
    started = time.monotonic()
    first = chroot.run(kvm_root, ["hshelper", "info"])
    took = time.monotonic() - started
    out = first.stdout.decode()
    assert first.returncode == 0, first.stderr.decode()
    reason = next(line for line in out.splitlines() if line.startswith("accelerator:"))
    assert reason.startswith("accelerator: tcg (a probe guest")
    assert "under kvm did not finish within 3 s (kvm is present but broken)" in reason
    assert took >= 3.0  # the probe ran and waited its bound
    cached = chroot.run(kvm_root, ["hshelper", "info"]).stdout.decode()
    assert "did not finish within 3 s" in cached and "(cached for this boot)" in cached
    for demand in (["--accel", "kvm"], ["--kvm=only"]):
        refused = chroot.run(kvm_root, ["helper-run", *demand, "true"])
        err = refused.stderr.decode()
        assert refused.returncode == 125, err
        assert "KVM was asked for but does not work" in err
        assert "did not finish within 3 s" in err
        assert not chroot.qemu_pids(kvm_root)
    fallback = chroot.run(kvm_root, ["helper-run", "-v", "sh", "-c", "echo on-tcg"])
    assert fallback.returncode == 0, fallback.stderr.decode()
    assert fallback.stdout == b"on-tcg\n"
    assert "using TCG: a probe guest" in fallback.stderr.decode()

"""The KVM probe: its firmware matches its source, it runs under TCG, and a broken or
missing KVM is reported as such (never trusted because /dev/kvm exists)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hshelper.qemu import machines, probe

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
X86 = machines.lookup("x86_64")


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="no binutils")
def test_embedded_firmware_is_the_assembled_source(tmp_path):
    src = Path(probe.__file__).with_name("probe.S")
    subprocess.run(["as", "-o", tmp_path / "p.o", src], check=True)
    subprocess.run(["ld", "-Ttext=0xf0000", "--oformat", "binary", "-o", tmp_path / "p.bin",
                    tmp_path / "p.o"], check=True, capture_output=True)
    assert (tmp_path / "p.bin").read_bytes() == probe.probe_firmware()


@needs_qemu
def test_probe_guest_reaches_long_mode_under_tcg():
    # The same firmware under TCG must exit with the expected status: this proves the
    # probe itself works, so a KVM timeout means KVM, not the probe.
    result = probe.run_probe(QEMU, X86, None, "tcg", timeout=20)
    assert result.usable, result.reason


@needs_qemu
def test_guest_that_never_finishes_is_killed_and_reported():
    # -S starts the guest paused, so it never runs: what a broken KVM looks like.
    before = _qemu_pids()
    result = probe.run_probe(QEMU, X86, None, "tcg", timeout=0.5, extra=["-S"])
    assert not result.usable
    assert "did not finish within 0.5 s" in result.reason
    assert _qemu_pids() <= before


def _qemu_pids() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "hshelper-probe-"], capture_output=True, text=True)
    return set(out.stdout.split())


def test_missing_device_explains_the_fix(tmp_path):
    result = probe.probe_kvm("qemu-system-x86_64", X86, device=str(tmp_path / "kvm"))
    assert not result.usable
    assert "does not exist" in result.reason and "--mountpoints=/dev/kvm" in result.reason


def test_unopenable_device_explains_the_fix():
    # As the unprivileged build user (tests run as root, for whom modes do not apply).
    with tempfile.TemporaryDirectory() as where:
        os.chmod(where, 0o755)
        dev = Path(where) / "kvm"
        dev.write_text("")
        dev.chmod(0o600)
        _check_unopenable(dev)


def _check_unopenable(dev: Path) -> None:
    code = ("import sys; from hshelper.qemu import probe; "
            "print(probe.device_problem(sys.argv[1]))")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code, str(dev)], capture_output=True, text=True,
                         cwd=Path(probe.__file__).parent.parent.parent,
                         env={"PYTHONPATH": "."})
    assert out.returncode == 0, out.stderr
    assert "not readable and writable by uid 65534" in out.stdout
    assert "kvm group" in out.stdout


def _hold(path, seconds: float, ready: threading.Event) -> None:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        ready.set()
        time.sleep(seconds)


@pytest.mark.parametrize("bound, held, waits", [(5.0, 0.6, True), (0.3, 3.0, False)])
def test_probe_lock_waits_for_a_peer_within_its_bound(tmp_path, bound, held, waits):
    """A parallel run waits for the peer's probe (then reads its answer); a peer that
    holds the lock longer than the bound is not waited for."""
    from hshelper.plugins.accel import probe_lock

    lock = tmp_path / "probe" / "kvm.lock"
    lock.parent.mkdir()
    ready = threading.Event()
    peer = threading.Thread(target=_hold, args=(lock, held, ready))
    peer.start()
    ready.wait(5)
    start = time.monotonic()
    with probe_lock(lock, bound):
        waited = time.monotonic() - start
    peer.join()
    if waits:
        assert held - 0.3 < waited < bound
    else:
        assert bound - 0.05 < waited < held


def test_kvm_is_not_tried_for_a_guest_of_another_architecture():
    result = probe.probe_kvm("qemu-system-aarch64", machines.lookup("aarch64"))
    assert not result.usable
    assert "KVM runs guests of the host's architecture (x86_64)" in result.reason
    assert "this guest is aarch64" in result.reason

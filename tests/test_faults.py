"""Faults end a run promptly with the true reason, as the build user in a build root:
the host's disk full under a disk image, qemu killed or stopped from outside, a guest
panic, a boot that never ends, damaged cache entries. Each test bounds the run, and
checks the exit status, the message, and that no qemu is left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import chroot
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def helper_run(root, *argv, cwd=chroot.HOME, **kwargs):
    return chroot.run(root, ["helper-run", *argv], cwd=cwd, **kwargs)


def test_host_disk_full_under_a_disk_ends_the_run(root):
    work = chroot.fresh_dir(root, "small")
    host = root / work.lstrip("/")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(host)],
                   check=True)
    try:
        os.chown(host, chroot.BUILD_UID, chroot.BUILD_UID)
        start = time.monotonic()
        proc = helper_run(root, "--disk", "d.img,size=200M,name=d", "sh", "-c",
                          "dd if=/dev/zero of=$HSHELPER_DISK_D bs=1M count=100 conv=fsync "
                          "&& echo wrote-it", cwd=work, timeout=120)
        took = time.monotonic() - start
        err = proc.stderr.decode()
        assert proc.returncode == 125, err
        assert f"no space left on device on the host, writing {work}/d.img" in err
        assert b"wrote-it" not in proc.stdout
        assert took < 60
        assert chroot.wait_no_qemu(root)
    finally:
        subprocess.run(["umount", "-l", str(host)], check=False)


def _start(root, *argv):
    """helper-run in the background as the build user; returns the Popen."""
    cmd = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
           "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
           "/bin/sh", "-c", f'cd {chroot.HOME} && exec "$@"', "sh", "helper-run", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_qemu_killed_from_outside(root):
    proc = _start(root, "sh", "-c", "echo started; sleep 100")
    assert proc.stdout.readline() == b"started\n"
    for pid in chroot.qemu_pids(root):
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == 125
    assert b"qemu was killed by signal 9" in proc.stderr.read()
    assert chroot.wait_no_qemu(root)


def test_qemu_stopped_is_bounded_by_the_timeout(root):
    proc = _start(root, "--timeout", "6", "sh", "-c", "echo started; sleep 100")
    assert proc.stdout.readline() == b"started\n"
    stopped = chroot.qemu_pids(root)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert proc.wait(timeout=60) == 124
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    err = proc.stderr.read().decode()
    assert "timed out: the command ran 6 s, the limit is 6 s" in err
    assert chroot.wait_no_qemu(root)


def test_guest_panic_reported_by_pvpanic(root):
    proc = helper_run(root, "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 30",
                      timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert "guest kernel panic" in err and "pvpanic" in err
    assert chroot.wait_no_qemu(root)


def test_a_boot_that_does_not_finish_has_its_own_limit(root):
    # A cold boot: a restored VM state can be quicker than any limit worth testing.
    proc = helper_run(root, "--set", "run.boot_timeout=0.5", "--set", "run.saved_states=false",
                      "true", timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert "did not finish booting within 0.5 s" in err and "never started" in err


def _cache(root) -> Path:
    return root / "home/builder/.cache/hshelper"


@pytest.mark.parametrize("artifact", ["images/*/initrd.cpio", "images/*/initrd",
                                      "kernels/*/vmlinux"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_entry_is_rebuilt(root, artifact, damage):
    first = helper_run(root, "true")
    assert first.returncode == 0, first.stderr
    entries = list(_cache(root).glob(artifact))
    assert entries, f"no {artifact} in the cache"
    for entry in entries:
        size = entry.stat().st_size
        with open(entry, "r+b") as fh:
            if damage == "truncate":
                fh.truncate(size // 2)
            else:
                fh.seek(size // 3)
                byte = fh.read(1)
                fh.seek(size // 3)
                fh.write(bytes([byte[0] ^ 0xFF]))
    proc = helper_run(root, "sh", "-c", "echo after")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout == b"after\n"
    assert "was damaged" in err
    again = helper_run(root, "true")
    assert again.returncode == 0 and b"damaged" not in again.stderr

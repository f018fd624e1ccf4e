"""Promises of the README and docs that had no test (../shared/TESTS-AUDIT.md, "none"),
each run for real as the build user in a build root."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import buildroots
import chroot
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vm]
CACHE = "home/builder/.cache/hshelper"


def helper_run(root, *argv, cwd=chroot.HOME, **kwargs):
    return chroot.run(root, ["helper-run", *argv], cwd=cwd, **kwargs)


def kernel_log(root, err: str) -> Path:
    """The console log a 125/124 message names: it must exist and be the guest's."""
    match = re.search(r"\(kernel log: (\S+)\)", err)
    assert match, err
    path = root / match.group(1).lstrip("/")
    assert path.is_file(), path
    return path


def test_a_timeout_leaves_no_qemu_and_names_the_kernel_log(root):
    proc = helper_run(root, "--timeout", "3", "sh", "-c", "echo started; sleep 100")
    err = proc.stderr.decode()
    assert proc.returncode == 124, err
    assert "timed out: the command ran 3 s, the limit is 3 s" in err
    kernel_log(root, err)
    assert chroot.wait_no_qemu(root)


def test_a_panic_names_a_kernel_log_that_holds_it(root):
    proc = helper_run(root, "sh", "-c", "echo c > /proc/sysrq-trigger")
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert "Kernel panic" in kernel_log(root, err).read_text(errors="replace")


def test_sigkill_of_helper_run_takes_qemu_along(root):
    """qemu dies with its parent (PR_SET_PDEATHSIG), even when the parent gets no chance
    to clean up."""
    argv = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
            "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "/bin/sh", "-c", f"cd {chroot.HOME} && exec helper-run sh -c 'echo up; sleep 100'"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    assert chroot.qemu_pids(root)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert chroot.wait_no_qemu(root, 10)


def test_memory_cpus_kernel_and_debug(root):
    version = sorted(p.name for p in (root / "lib/modules").iterdir())[-1]
    proc = helper_run(root, "--debug", "--memory", "300", "--cpus", "2", "--kernel", version,
                      "sh", "-c", "grep MemTotal /proc/meminfo; nproc; uname -r")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    mem, cpus, release = proc.stdout.decode().splitlines()
    assert 250_000 < int(mem.split()[1]) <= 300 * 1024
    assert (cpus, release) == ("2", version)
    assert re.search(r"^\+ \S*qemu-system-x86_64 .* -m 300 -smp 2 ", err, re.M), err


def test_the_image_is_rebuilt_when_a_program_in_the_build_root_changes(root):
    build = ["hshelper", "build", "--json"]
    first = chroot.run(root, build)
    assert first.returncode == 0, first.stderr.decode()
    sfdisk = root / "usr/sbin/sfdisk"
    stat = sfdisk.stat()
    os.utime(sfdisk, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        again = chroot.run(root, build)
        assert again.returncode == 0, again.stderr.decode()
        assert b'"cached": false' in again.stdout
    finally:
        os.utime(sfdisk, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    back = chroot.run(root, build)
    assert b'"cached": true' in back.stdout  # the first image, found again


def test_clean_removes_everything_it_cached(root):
    assert helper_run(root, "true").returncode == 0
    cache = root / CACHE
    assert any(cache.iterdir())
    proc = chroot.run(root, ["hshelper", "clean"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in cache.iterdir()) == []


def test_the_cloud_kernel_without_9p_says_what_to_install(root_factory):
    """The cloud kernel root has no qemu of its own: hshelper runs on the host as the
    build user with --sysroot (the host's qemu)."""
    cloud = root_factory("bookworm-cloud")
    host = buildroots.CACHE / "host"
    host.mkdir(parents=True, exist_ok=True)
    host.chmod(0o755)
    staged = chroot.host_install(host)
    home = host / "home" / "cloud"
    subprocess.run(["rm", "-rf", str(home)], check=True)
    home.mkdir(parents=True)
    home.parent.chmod(0o755)
    os.chown(home, chroot.BUILD_UID, chroot.BUILD_UID)
    proc = chroot.run_host(staged, "helper-run", ["--sysroot", str(cloud), "true"], home, home)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert "has no 9p support" in err and "linux-image-amd64" in err
    # Without the share it runs, on the image's own programs.
    alone = chroot.run_host(staged, "helper-run", ["--sysroot", str(cloud), "--no-share-cwd",
                                                   "sh", "-c", "echo ok"], home, home)
    assert alone.returncode == 0, alone.stderr.decode()
    assert alone.stdout == b"ok\n"


@pytest.mark.parametrize("mode", ["root", "image"])
def test_a_working_directory_under_tmp_is_shared(root, mode):
    """The guest's /tmp is its own tmpfs; the build user's directory under /tmp is
    mounted on it (issue 16: --mode root used to skip it and fail to cd)."""
    host = root / "tmp/hshelper-test-tmpcwd"
    subprocess.run(["rm", "-rf", str(host)], check=True)
    host.mkdir()
    os.chown(host, chroot.BUILD_UID, chroot.BUILD_UID)
    proc = helper_run(root, "--mode", mode, "sh", "-c", "pwd; echo hi > made-here",
                      cwd="/tmp/hshelper-test-tmpcwd")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"/tmp/hshelper-test-tmpcwd\n"
    made = host / "made-here"
    assert made.read_text() == "hi\n" and made.stat().st_uid == chroot.BUILD_UID
    subprocess.run(["rm", "-rf", str(host)], check=True)


def test_the_demo_runs(root):
    """scripts/demo's steps (set-up aside: tests/run did it): the image is built in the
    build root, checked on the host, and boots to its marker under OVMF."""
    script = Path(__file__).resolve().parent.parent / "scripts/demo.py"
    started = time.monotonic()
    proc = subprocess.run([os.sys.executable, str(script)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "HSHELPER-MARKER done" in proc.stdout, proc.stdout[-3000:]
    assert time.monotonic() - started < 1200

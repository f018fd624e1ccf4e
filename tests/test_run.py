"""`helper-run` against real VMs (TCG here), as the build user inside a build root."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import chroot
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def helper_run(root, *argv, cwd=chroot.HOME, **kwargs):
    return chroot.run(root, ["helper-run", *argv], cwd=cwd, **kwargs)


def test_stdout_stderr_separate_and_exact(root):
    script = "printf 'out1\\n'; printf 'err1\\n' >&2; printf 'out2 \\001\\377'; exit 0"
    proc = helper_run(root, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"out1\nout2 \x01\xff"
    assert proc.stderr == b"err1\n"


@pytest.mark.parametrize("status", [0, 7, 255])
def test_exit_status_passes_through(root, status):
    proc = helper_run(root, "sh", "-c", f"exit {status}")
    assert proc.returncode == status, proc.stderr


def test_not_found_is_127_at_once_with_advice(root):
    """Neither installed nor in the working directory: 127 before any VM starts."""
    before = time.monotonic()
    proc = helper_run(root, "no-such-program-xyz", "arg")
    assert proc.returncode == 127
    err = proc.stderr.decode()
    assert "no-such-program-xyz: command not found in the build root" in err
    assert "apt-file search no-such-program-xyz" in err
    assert time.monotonic() - before < 10 and not chroot.qemu_pids(root)
    known = helper_run(root, "kpartx", "-l", "x")  # not installed here: its package named
    assert known.returncode == 127 and b"install kpartx in the build root" in known.stderr


def test_not_executable_is_126(root):
    work = chroot.fresh_dir(root, "noexec")
    script = root / work.lstrip("/") / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    os.chown(script, chroot.BUILD_UID, chroot.BUILD_UID)
    proc = helper_run(root, "./script.sh", cwd=work)
    assert proc.returncode == 126, proc.stderr


def test_timeout_is_124(root):
    start = time.monotonic()
    proc = helper_run(root, "--timeout", "8", "sleep", "100")
    assert proc.returncode == 124
    assert time.monotonic() - start < 60
    assert b"timed out" in proc.stderr


def test_guest_panic_is_125(root):
    proc = helper_run(root, "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert proc.returncode == 125
    assert b"panic" in proc.stderr.lower()


def test_stdin_heredoc_and_environment(root):
    proc = helper_run(root, "sh", "-c", 'cat; echo "[$MYVAR]"', input=b"line1\nline2\n",
                      env={"MYVAR": "it's here", "LD_PRELOAD": "libfakeroot-sysv.so"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"line1\nline2\n[it's here]\n"
    proc = helper_run(root, "sh", "-c", 'echo "[${LD_PRELOAD-unset}]"',
                      env={"LD_PRELOAD": "libfakeroot-sysv.so"})
    assert proc.stdout == b"[unset]\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_live_output_arrives_before_the_end(root, stream):
    """The first line must be on the host while the command still runs, on either
    stream (-q: no heartbeat lines on stderr)."""
    to = "" if stream == "stdout" else " >&2"
    argv = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
            "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "/bin/sh", "-c", f"cd {chroot.HOME} && exec helper-run -q sh -c "
            f"'echo first{to}; sleep 6; echo second{to}'"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pipe, other = (proc.stdout, proc.stderr) if stream == "stdout" else (proc.stderr,
                                                                          proc.stdout)
    first = pipe.readline()
    got_first = time.monotonic()
    rest = pipe.read()
    ended = time.monotonic()
    proc.wait(timeout=120)
    assert first == b"first\n" and rest == b"second\n"
    assert other.read() == b""
    assert ended - got_first > 4  # the first line came while `sleep 6` still ran


def test_files_in_cwd_belong_to_build_user(root):
    work = chroot.fresh_dir(root, "owned")
    proc = helper_run(root, "sh", "-c", "id -u > whoami; mkdir d; echo x > d/f", cwd=work)
    assert proc.returncode == 0, proc.stderr
    host = root / work.lstrip("/")
    assert (host / "whoami").read_text().strip() == "0"  # root in the guest
    for path in (host / "whoami", host / "d", host / "d/f"):
        assert path.stat().st_uid == chroot.BUILD_UID


def test_disk_partitioned_and_formatted(root):
    work = chroot.fresh_dir(root, "disk")
    script = (
        'set -e\n'
        'dev=$HSHELPER_DISK_OUT\n'
        'test "$(readlink -f /dev/disk/hshelper/out)" = "$dev"\n'
        'printf "label: gpt\\n,64M,U\\n,,L\\n" | sfdisk -q "$dev"\n'
        'mkfs.vfat -n ESP "${dev}1" >/dev/null\n'
        'mkfs.ext4 -q -L root "${dev}2"\n'
        'mkdir -p /mnt/r && mount "${dev}2" /mnt/r && echo hello > /mnt/r/hello && umount /mnt/r\n'
    )
    proc = helper_run(root, "--disk", "out.img,size=200M,name=out", "sh", "-c", script,
                      cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""  # mkfs.vfat finds its codepage: no iconv warnings
    image = root / work.lstrip("/") / "out.img"
    assert image.stat().st_uid == chroot.BUILD_UID
    dump = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True,
                          check=True).stdout
    assert "label: gpt" in dump
    assert "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" in dump  # ESP type
    assert "0FC63DAF-8483-4772-8E79-3D69D8477DE4" in dump  # Linux filesystem
    starts = [int(line.split("start=")[1].split(",")[0]) for line in dump.splitlines()
              if "start=" in line]
    sizes = [int(line.split("size=")[1].split(",")[0]) for line in dump.splitlines()
             if "size=" in line]
    check_partitions(image, starts, sizes)


def check_partitions(image, starts, sizes):
    for i, (start, size) in enumerate(zip(starts, sizes)):
        part = image.with_suffix(f".p{i + 1}")
        subprocess.run(["dd", f"if={image}", f"of={part}", "bs=512", f"skip={start}",
                        f"count={size}", "status=none"], check=True)
        fsck = ["fsck.vfat", "-n", str(part)] if i == 0 else ["e2fsck", "-fn", str(part)]
        assert subprocess.run(fsck, capture_output=True).returncode == 0, fsck
        if i == 1:
            out = subprocess.run(["debugfs", "-R", "cat /hello", str(part)],
                                 capture_output=True, text=True).stdout
            assert out == "hello\n"
        part.unlink()


def test_loop_device_round_trip(root):
    work = chroot.fresh_dir(root, "loop")
    script = (
        'set -e\n'
        'truncate -s 64M file.img\n'
        'printf "label: dos\\n,,83\\n" | sfdisk -q file.img\n'
        'dev=$(losetup -fP --show file.img)\n'
        'mkfs.ext4 -q "${dev}p1"\n'
        'mount "${dev}p1" /mnt && echo loop-ok > /mnt/marker && umount /mnt\n'
        'losetup -d "$dev"\n'
    )
    proc = helper_run(root, "sh", "-c", script, cwd=work)
    assert proc.returncode == 0, proc.stderr
    image = root / work.lstrip("/") / "file.img"
    dump = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True,
                          check=True).stdout
    start = int(dump.split("start=")[1].split(",")[0])
    size = int(dump.split("size=")[1].split(",")[0])
    part = image.with_suffix(".p1")
    subprocess.run(["dd", f"if={image}", f"of={part}", "bs=512", f"skip={start}",
                    f"count={size}", "status=none"], check=True)
    out = subprocess.run(["debugfs", "-R", "cat /marker", str(part)], capture_output=True,
                         text=True).stdout
    assert out == "loop-ok\n"


qemu_pids = chroot.qemu_pids


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP"])
def test_sigterm_leaves_no_qemu_and_no_temp_files(root, sig, status):
    before = set(os.listdir(root / "tmp"))
    argv = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
            "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "helper-run", "sh", "-c", "echo started; sleep 100"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/")
    assert proc.stdout.readline() == b"started\n"
    assert qemu_pids(root), "qemu should be running now"
    # chroot execs helper-run, so proc.pid is helper-run itself.
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=30) == status
    deadline = time.monotonic() + 10
    while qemu_pids(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_pids(root)
    assert set(os.listdir(root / "tmp")) == before


def test_without_proc_the_share_is_diagnosed(bookworm):
    # No /proc mounted here (a hasher chroot without --mountpoints=/proc).
    assert not (bookworm / "proc/self").exists()
    proc = helper_run(bookworm, "true")
    assert proc.returncode == 125
    err = proc.stderr.decode()
    assert "/proc" in err and "mountpoints=/proc" in err
    # Without the share it runs: the guest does not need the host's /proc.
    proc = helper_run(bookworm, "--no-share-cwd", "sh", "-c", "echo ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"ok\n"


def test_skip_without_kvm_exits_0_with_warning(root):
    proc = helper_run(root, "--skip-without-kvm", "sh", "-c", "exit 3")
    assert proc.returncode == 0
    assert b"skipping" in proc.stderr


def test_mode_root_runs_the_build_roots_own_programs(root):
    """--mode root: qemu-img is installed in the build root but not in the image."""
    work = chroot.fresh_dir(root, "rootmode")
    script = "command -v qemu-img && qemu-img --version | head -1 && pwd && echo hi > out.txt"
    proc = helper_run(root, "--mode", "root", "sh", "-c", script, cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "/usr/bin/qemu-img" and "qemu-img version" in lines[1]
    assert lines[2] == work
    out = root / work.lstrip("/") / "out.txt"
    assert out.read_text() == "hi\n" and out.stat().st_uid == chroot.BUILD_UID
    missing = helper_run(root, "--mode", "root", "no-such-tool-xyz", cwd=work)
    assert missing.returncode == 127


@pytest.mark.parametrize("mode", ["image", "root"])
def test_the_whole_command_root_can_be_walked(root, mode):
    """Scripts walk the root (find /, tar -C /, du): no directory of hshelper's own in
    it may fail to read (an overlay's upper directory under its lower one reads as
    ELOOP), and what the command writes outside its shares stays in the VM. The build
    root's own directories that the build user cannot read (/root) stay unreadable:
    qemu's 9p server runs as that user."""
    script = "echo x >/etc/hsh-walk && find / -xdev >/dev/null; cat /etc/hsh-walk"
    proc = helper_run(root, "--mode", mode, "sh", "-c", script)
    errors = proc.stderr.decode().splitlines()
    assert errors and "find: '/root': Permission denied" in [e.replace("‘", "'").replace(
        "’", "'") for e in errors], errors  # the walk got as far as the build root
    assert [e for e in errors if "Permission denied" not in e] == []
    assert proc.stdout == b"x\n" and not (root / "etc/hsh-walk").exists()


@pytest.mark.parametrize("with_proc", [True, False])
def test_hasher_like_root(root_factory, with_proc):
    """/dev with only null, zero and urandom; with /proc the cwd is shared and the
    output belongs to the build user; without it the share is refused with the fix and
    --no-share-cwd still runs a disk job."""
    hasher = root_factory("hasher-like")
    assert sorted(p.name for p in (hasher / "dev").iterdir()) == ["null", "urandom", "zero"]
    work = chroot.fresh_dir(hasher, "job")
    script = ("printf 'label: gpt\\n,,L\\n' | sfdisk -q $HSHELPER_DISK_OUT && "
              "mkfs.ext4 -q ${HSHELPER_DISK_OUT}1 && echo formatted")
    if with_proc:
        with chroot.proc_mounted(hasher):
            proc = helper_run(hasher, "--disk", "out.img,size=64M,name=out", "sh", "-c",
                              script + " && echo ok > done.txt", cwd=work)
        assert proc.returncode == 0, proc.stderr.decode()
        done = hasher / work.lstrip("/") / "done.txt"
        assert done.read_text() == "ok\n" and done.stat().st_uid == chroot.BUILD_UID
    else:
        refused = helper_run(hasher, "true", cwd=work)
        assert refused.returncode == 125 and b"mountpoints=/proc" in refused.stderr
        proc = helper_run(hasher, "--no-share-cwd", "--disk", "out.img,size=64M,name=out",
                          "sh", "-c", script, cwd=work)
        assert proc.returncode == 0, proc.stderr.decode()
    assert b"formatted" in proc.stdout
    image = hasher / work.lstrip("/") / "out.img"
    assert image.stat().st_uid == chroot.BUILD_UID
    dump = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True)
    assert "label: gpt" in dump.stdout

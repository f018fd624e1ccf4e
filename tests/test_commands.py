"""`hshelper shell`, `hshelper info`, the heartbeat, scripts' interpreters and the program
budget: as the build user inside the bookworm build root, against real VMs (TCG)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import termios
import time

import chroot
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def script_in(root, work: str, name: str, text: str) -> None:
    path = root / work.lstrip("/") / name
    path.write_text(text)
    path.chmod(0o755)
    os.chown(path, chroot.BUILD_UID, chroot.BUILD_UID)


def test_shell_runs_typed_commands_as_root_in_the_vm(root):
    work = chroot.fresh_dir(root, "shell")
    typed = b'echo "uid=$(id -u) cwd=$(pwd)"\necho made > by-shell.txt\nexit 3\n'
    proc = chroot.run(root, ["hshelper", "shell"], cwd=work, input=typed)
    assert proc.returncode == 3, proc.stderr.decode()
    assert f"uid=0 cwd={work}\n".encode() in proc.stdout
    made = root / work.lstrip("/") / "by-shell.txt"
    assert made.read_text() == "made\n" and made.stat().st_uid == chroot.BUILD_UID


def test_info_says_what_was_found(root):
    proc = chroot.run(root, ["hshelper", "info"])
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "kernel: 6.1." in out and "/boot/vmlinuz-6.1." in out
    assert "qemu: /usr/bin/qemu-system-x86_64" in out
    accel = next(line for line in out.splitlines() if line.startswith("accelerator:"))
    # The build root has no /dev/kvm (tests/test_kvm.py gives it this machine's broken one).
    assert accel.startswith("accelerator: tcg (/dev/kvm does not exist"), accel
    arch = next(line for line in out.splitlines() if line.startswith("guest architecture:"))
    assert arch.startswith("guest architecture: x86_64 (") and "/modules/" in arch
    assert arch.endswith(".ko is an ELF x86_64 file)")  # a kernel module's header said
    programs = next(line for line in out.splitlines() if line.startswith("programs:")).split()
    assert {"sfdisk", "mkfs.ext4", "mkfs.vfat", "losetup", "mount"} <= set(programs)
    assert "sgdisk (" in out and "--with sgdisk" in out  # left out, and how to add it


def test_heartbeat_on_silence_and_quiet_turns_it_off(root):
    argv = ["helper-run", "--set", "heartbeat.interval=1", "sh", "-c", "sleep 4; echo done"]
    loud = chroot.run(root, argv)
    assert loud.returncode == 0 and loud.stdout == b"done\n", loud.stderr.decode()
    beats = [line for line in loud.stderr.decode().splitlines() if "still running" in line]
    assert beats and beats[0].startswith("hshelper: sh still running (")
    quiet = chroot.run(root, [*argv[:1], "-q", *argv[1:]])
    assert quiet.returncode == 0 and quiet.stdout == b"done\n"
    assert b"still running" not in quiet.stderr


def test_scripts_run_with_the_build_roots_interpreters(root):
    """bash and python3 are the build root's own (not in the image); a script whose
    interpreter is missing is 127; with the image alone (--mode isolated) a #!/bin/bash
    script brings bash into the image, and python3 is 127 with advice."""
    work = chroot.fresh_dir(root, "interp")
    script_in(root, work, "b.sh", '#!/bin/bash\n[[ -n "$BASH_VERSION" ]] && echo "in bash"\n')
    script_in(root, work, "p.py", "#!/usr/bin/env python3\nprint('hi')\n")
    script_in(root, work, "x.sh", "#!/usr/bin/no-such-interpreter\necho never\n")
    proc = chroot.run(root, ["helper-run", "./b.sh"], cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"in bash\n"
    proc = chroot.run(root, ["helper-run", "p.py"], cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"hi\n"
    proc = chroot.run(root, ["helper-run", "./x.sh"], cwd=work)
    assert proc.returncode == 127 and b"never" not in proc.stdout
    proc = chroot.run(root, ["helper-run", "--mode", "isolated", "./b.sh"], cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"in bash\n"
    proc = chroot.run(root, ["helper-run", "--mode", "isolated", "p.py"], cwd=work)
    assert proc.returncode == 127
    assert "needs python3" in proc.stderr.decode()


def _manifest_paths(root, data: dict) -> set[str]:
    manifest = root / data["manifest"].lstrip("/")
    return {json.loads(line)["path"] for line in manifest.read_text().splitlines()}


def test_program_budget_leaves_heavy_extras_out_and_with_adds_them(root):
    cache = chroot.fresh_dir(root, "budget-cache")
    env = {"XDG_CACHE_HOME": cache}

    def build(*extra):
        proc = chroot.run(root, ["hshelper", "build", "--json", *extra], env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        data = json.loads(proc.stdout)
        return data, _manifest_paths(root, data)

    default, paths = build()
    assert "/usr/sbin/sfdisk" in paths  # essential: in, whatever it weighs
    assert "/usr/sbin/sgdisk" not in paths
    assert not any("libstdc++" in p for p in paths)
    assert any(m.startswith("sgdisk (") and "--with sgdisk" in m for m in default["missing"])
    with_sgdisk, paths = build("--with", "sgdisk")
    assert "/usr/sbin/sgdisk" in paths and any("libstdc++" in p for p in paths)
    assert with_sgdisk["size"] > default["size"]
    unlimited, paths = build("--set", "image.program_budget_kb=0")
    assert {"/usr/sbin/sgdisk", "/usr/bin/bash", "/usr/bin/zstd"} <= paths
    assert not any("--with" in m for m in unlimited["missing"])


def test_extra_shares_read_only_and_writable(root):
    work = chroot.fresh_dir(root, "shares")
    src = chroot.fresh_dir(root, "shares-src")
    out = chroot.fresh_dir(root, "shares-out")
    (root / src.lstrip("/") / "input.txt").write_text("from the host\n")
    script = ("cat /input/input.txt; "
              "if touch /input/new 2>/dev/null; then echo ro-written; else echo ro-refused; fi; "
              f"echo made > {out}/result.txt")
    proc = chroot.run(root, ["helper-run", "--share", f"{src}:/input:ro", "--share", out,
                             "sh", "-c", script], cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"from the host\nro-refused\n"
    assert not (root / src.lstrip("/") / "new").exists()
    result = root / out.lstrip("/") / "result.txt"
    assert result.read_text() == "made\n" and result.stat().st_uid == chroot.BUILD_UID
    bad = chroot.run(root, ["helper-run", "--share", "/no/such/dir", "true"], cwd=work)
    assert bad.returncode == 2 and b"is not a directory" in bad.stderr


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_sigint_is_130_and_leaves_no_qemu(root):
    from test_run import qemu_pids

    argv = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
            "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "helper-run", "sh", "-c", "echo started; sleep 100"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    assert proc.stdout.readline() == b"started\n"
    # Only our qemu: the child of this helper-run (other runs may share the root).
    pids = {pid for pid in qemu_pids(root) if _parent(pid) == proc.pid}
    assert pids, "qemu should be running now"
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    deadline = time.monotonic() + 10
    while pids & qemu_pids(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pids & qemu_pids(root)


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_shell_on_a_terminal_reads_lines_and_ctrl_c_stops_the_vm(root):
    """hshelper shell with a real terminal (a pty as its controlling tty): the banner,
    a typed line runs as root in the VM, and Ctrl-C (the tty's interrupt character)
    stops the VM: status 130, no qemu left."""
    from test_run import qemu_pids

    work = chroot.fresh_dir(root, "shell-tty")
    main, side = pty.openpty()
    argv = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
            "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "TERM=dumb", "/bin/sh", "-c", f"cd {work} && exec hshelper shell"]
    proc = subprocess.Popen(argv, stdin=side, stdout=side, stderr=side, cwd="/",
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(side)
    try:
        banner = _read_until(main, b"Ctrl-C stops the VM", 120)
        assert b"a root shell in the helper VM" in banner, banner
        os.write(main, b'echo "tty-$(( 6 * 7 ))-$(id -u)"\n')
        out = _read_until(main, b"tty-42-0", 120)
        assert b"tty-42-0" in out, out
        pids = {pid for pid in qemu_pids(root) if _parent(pid) == proc.pid}
        assert pids, "qemu should be running now"
        os.write(main, b"\x03")
        assert proc.wait(timeout=30) == 130
        deadline = time.monotonic() + 10
        while pids & qemu_pids(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pids & qemu_pids(root)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)

"""The helper VM: qemu's command line (pure) and the supervised qemu process.

Host and guest talk over virtio-serial ports whose host ends are socketpairs inherited by
qemu (``-chardev socket,fd=N``): no paths on disk, nothing left behind. Ports: the
command's stdout, stderr and stdin, and its exit status; the kernel console (ttyS0) goes
to a log file. qemu dies with us (PR_SET_PDEATHSIG) and is killed on timeout or signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hshelper.errors import EXIT_FAILED, EXIT_TIMEOUT, HshelperError

PORTS = ("stdout", "stderr", "status", "stdin")
PORT_PREFIX = "org.hshelper."
QEMU_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
             "ppc64le": "ppc64", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Machine:
    """What qemu boots: the accelerator, sizes and the kernel/initrd to load."""

    accel: str
    memory_mb: int
    cpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    tcg_cpu: str = "max"  # the CPU model under TCG (KVM always passes the host's)


def default_qemu() -> str:
    arch = QEMU_ARCH.get(platform.machine(), platform.machine())
    return f"qemu-system-{arch}"


def find_qemu(configured: str) -> str:
    name = configured or default_qemu()
    path = shutil.which(name)
    if path is None:
        raise HshelperError(f"{name} not found on PATH",
                            hint="install qemu into the build root (Debian: qemu-system-x86, "
                                 "ALT/Fedora: qemu-system-x86-core or qemu-kvm-core)")
    return path


def qemu_argv(qemu: str, machine: Machine, fds: dict[str, int], extra: list[str]) -> list[str]:
    """The qemu command line. ``fds`` maps "console" and each PORTS name to the fd
    number qemu inherits for it; ``extra`` are plugin arguments (shares, disks)."""
    kvm = machine.accel == "kvm"
    argv = [
        qemu,
        "-nodefaults", "-no-user-config",  # only what we ask for, no ~/.config surprises
        "-display", "none",
        "-machine", f"pc,accel={machine.accel}",
        "-cpu", "host" if kvm else machine.tcg_cpu,
        "-m", str(machine.memory_mb),
        "-smp", str(machine.cpus),
        "-no-reboot",  # the guest's reboot request is how it stops
        "-nic", "none",  # no network unless a plugin adds one
        "-kernel", str(machine.kernel),
        "-initrd", str(machine.initrd),
        "-append", machine.cmdline,
        "-chardev", f"socket,id=console,fd={fds['console']}",
        "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=hshser",
    ]
    for port in PORTS:
        argv += ["-chardev", f"socket,id=hsh{port},fd={fds[port]}",
                 "-device", f"virtserialport,bus=hshser.0,chardev=hsh{port},"
                            f"name={PORT_PREFIX}{port}"]
    return argv + list(extra)


def _pdeathsig() -> None:
    """In the child before exec: die with the parent, so qemu never outlives us."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Monitor:
    """Live facts about a running VM, for plugins that watch it (heartbeat)."""

    started: float = field(default_factory=time.monotonic)
    last_output: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Outcome:
    """How the VM run ended: ``status`` is the exit status to use, ``reason`` says why
    when it is not the guest command's own."""

    status: int
    reason: str
    boot_seconds: float | None
    console_tail: str


PANIC = re.compile(r"Kernel panic - not syncing:.*")


class VM:
    """One qemu process and its channels."""

    def __init__(self, qemu: str, machine: Machine, extra: list[str], console_log: Path,
                 stdin: bool, verbose: bool = False):
        self.qemu = qemu
        self.machine = machine
        self.extra = extra
        self.console_log = console_log
        self.forward_stdin = stdin
        self.verbose = verbose
        self.monitor = Monitor()
        self.proc: subprocess.Popen | None = None
        self._ours: dict[str, socket.socket] = {}
        self._theirs: dict[str, socket.socket] = {}
        for name in ("console", *PORTS):
            ours, theirs = socket.socketpair()
            self._ours[name], self._theirs[name] = ours, theirs
        self.argv = qemu_argv(qemu, machine, {n: s.fileno() for n, s in self._theirs.items()},
                              extra)

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=[s.fileno() for s in self._theirs.values()],
                preexec_fn=_pdeathsig, start_new_session=True)
        except OSError as exc:
            raise HshelperError(f"cannot start {self.qemu}: {exc.strerror}") from exc
        for sock in self._theirs.values():
            sock.close()
        if self.forward_stdin:
            threading.Thread(target=self._pump_stdin, daemon=True).start()
        else:
            # The guest reads /dev/null then; closing tells qemu nobody will write.
            self._ours["stdin"].close()

    def _pump_stdin(self) -> None:
        sock = self._ours["stdin"]
        try:
            while True:
                chunk = os.read(sys.stdin.fileno(), 65536)
                if not chunk:
                    break
                sock.sendall(chunk)
        except OSError:
            pass
        finally:
            # A closed host end is an EOF for the guest's reader.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout: float | None, stop: threading.Event) -> Outcome:
        """Stream output until qemu exits; returns how it ended.

        ``stop`` is set by the signal handlers (SIGINT/SIGTERM): the VM is killed and
        the outcome carries the signal's conventional status.
        """
        assert self.proc is not None and self.proc.stderr is not None
        sel = selectors.DefaultSelector()
        out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        for name in ("console", "stdout", "stderr", "status"):
            self._ours[name].setblocking(False)
            sel.register(self._ours[name], selectors.EVENT_READ, name)
        qemu_err = self.proc.stderr
        os.set_blocking(qemu_err.fileno(), False)
        sel.register(qemu_err, selectors.EVENT_READ, "qemu")
        status_text = b""
        qemu_msgs = b""
        boot_seconds = None
        deadline = None if not timeout else time.monotonic() + timeout
        timed_out = False
        log = open(self.console_log, "wb")  # noqa: SIM115 - closed in finally
        try:
            while sel.get_map():
                wait_for = 0.2
                if deadline is not None:
                    wait_for = max(0.0, min(wait_for, deadline - time.monotonic()))
                for key, _ in sel.select(wait_for):
                    name = key.data
                    try:
                        data = (os.read(qemu_err.fileno(), 65536) if name == "qemu"
                                else key.fileobj.recv(65536))
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        continue
                    if name in out:
                        if boot_seconds is None:
                            boot_seconds = time.monotonic() - self.monitor.started
                        out[name].write(data)
                        out[name].flush()
                        self.monitor.last_output = time.monotonic()
                    elif name == "status":
                        status_text += data
                        if boot_seconds is None:
                            boot_seconds = time.monotonic() - self.monitor.started
                    elif name == "console":
                        log.write(data)
                        log.flush()
                        if self.verbose:
                            sys.stderr.buffer.write(data)
                            sys.stderr.buffer.flush()
                    else:
                        qemu_msgs += data
                if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    timed_out = not stop.is_set()
                    self.kill()
                    # Keep draining what is already buffered, then leave.
                    deadline = None
                if self.proc.poll() is not None and not any(
                        k.data == "qemu" for k in sel.get_map().values()):
                    # qemu is gone and its stderr closed: the sockets hold the rest.
                    for key in list(sel.get_map().values()):
                        self._drain(key, out, log)
                        sel.unregister(key.fileobj)
        finally:
            log.close()
            sel.close()
            for sock in self._ours.values():
                sock.close()
            self.kill()
            self.monitor.finished.set()
        return self._outcome(status_text, qemu_msgs, timed_out, stop, boot_seconds)

    def _drain(self, key, out, log) -> None:
        while True:
            try:
                data = key.fileobj.recv(65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            if key.data in out:
                out[key.data].write(data)
                out[key.data].flush()
            elif key.data == "console":
                log.write(data)

    def _outcome(self, status_text: bytes, qemu_msgs: bytes, timed_out: bool,
                 stop: threading.Event, boot_seconds: float | None) -> Outcome:
        console = self.console_log.read_text(errors="replace")
        tail = "\n".join(console.splitlines()[-25:])
        if stop.is_set():
            return Outcome(getattr(stop, "status", 130), "interrupted", boot_seconds, tail)
        if timed_out:
            return Outcome(EXIT_TIMEOUT, "timed out", boot_seconds, tail)
        match = re.search(rb"status (\d+)", status_text)
        if match:
            return Outcome(int(match.group(1)), "", boot_seconds, tail)
        panic = PANIC.search(console)
        if panic:
            return Outcome(EXIT_FAILED, f"guest kernel panic: {panic.group(0).strip()}",
                           boot_seconds, tail)
        msgs = qemu_msgs.decode(errors="replace").strip().splitlines()
        rc = self.proc.returncode if self.proc else None
        if msgs and rc:
            return Outcome(EXIT_FAILED, f"qemu failed: {msgs[-1]}", boot_seconds, tail)
        return Outcome(EXIT_FAILED, f"the guest stopped without reporting an exit status "
                       f"(qemu exit {rc})", boot_seconds, tail)

"""One helper VM: qemu started, its channels served, its end classified.

The run follows the guest ABI (hshelper.guestabi): the guest boots and says ``ready``;
the host answers with the run script; the guest says ``started``, the command's output
streams back, ``status N`` ends it. Meanwhile qemu's control channel (QMP) reports
what qemu knows: a fatal event (a write error on a disk, a guest panic, an unexplained
pause) ends the run at once instead of leaving a paused VM to wait for an operator.

Limits: the boot (until ``started``) and the command (from ``started``) have separate
deadlines, so a timeout says which one ran out; a stop request (SIGINT/SIGTERM) kills
qemu at once. qemu never outlives this object (hshelper.qemu.process).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hshelper import guestabi
from hshelper.errors import HshelperError
from hshelper.qemu import outcome, process, ramfile
from hshelper.qemu.argv import BootSpec, qemu_argv, ram_backend
from hshelper.qemu.channels import Channels, Loop
from hshelper.qemu.machines import Machine
from hshelper.qemu.qmp import QMP

# Events that end a run at once: qemu has paused the guest (or it panicked) and nobody
# will resume it. BLOCK_IO_ERROR with action "stop" comes from werror=stop on a drive.
FATAL_EVENTS = ("GUEST_PANICKED",)
DRAIN_SECONDS = 2.0  # after qemu exits, how long buffered output may take to arrive
# A saved state's stream leaves out the guest's RAM, which is a file of its own
# (hshelper.qemu.ramfile): qemu skips RAM blocks that are shared file mappings.
RAM_NOT_IN_STREAM = [{"capability": "x-ignore-shared", "state": True}]


@dataclass
class Activity:
    """Live facts about a running VM, for plugins that watch it (heartbeat)."""

    started: float = field(default_factory=time.monotonic)
    last_output: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Limits:
    """Deadlines in seconds (None: none): booting until the command starts, the
    command itself."""

    boot: float | None = None
    command: float | None = None


@dataclass
class StopRequest:
    """Set by signal handlers: the run ends with ``status`` (128 + the signal)."""

    event: threading.Event = field(default_factory=threading.Event)
    status: int = 130

    def request(self, status: int) -> None:
        self.status = status
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def fatal(event: dict) -> bool:
    """Whether a qemu event means the guest will never continue by itself."""
    name = event.get("event")
    if name == "BLOCK_IO_ERROR":
        return event.get("data", {}).get("action") == "stop"
    return name in FATAL_EVENTS


class RestoreFailed(Exception):
    """qemu could not load a saved state (the caller boots cold instead)."""


def restore_prelude(now: float, entropy: bytes) -> bytes:
    """Run-script lines for a restored guest: its clock (it stood still since the save)
    and fresh bytes for its RNG pool; then, where the image has hshelper.reseed's
    program (machines without vmgenid, whose kernel would not reseed by itself), the
    reseed from that pool."""
    octal = "".join(f"\\{b:03o}" for b in entropy)
    return (f"date -s @{int(now)} >/dev/null 2>&1\n"
            f"printf '{octal}' >/dev/urandom\n"
            f"[ ! -x {guestabi.RESEED} ] || {guestabi.RESEED} </dev/urandom ||\n"
            f"    hsh_fail 'the RNG reseed after the restore failed'\n").encode()


class VM:
    """One qemu process and its channels."""

    def __init__(self, qemu: str, machine: Machine, boot: BootSpec, devices: list[str],
                 console_log: Path, forward_stdin: bool = False, verbose: bool = False,
                 disk_files: dict[str, str] | None = None,
                 on_event: Callable[[dict], str | None] | None = None):
        self.qemu = qemu
        self.machine = machine
        self.boot = boot
        self.devices = devices
        self.console_log = console_log
        self.forward_stdin = forward_stdin
        self.verbose = verbose
        self.disk_files = disk_files or {}
        self.on_event = on_event
        self.activity = Activity()
        self.channels = Channels(("console", "qmp", *guestabi.PORTS))
        self.argv = qemu_argv(qemu, machine, boot, self.channels.fds(), devices)
        self.proc = None
        self.qmp = QMP(self.channels.ours["qmp"], on_event=self._event)
        self.script = b""
        self.restore_from: Path | None = None  # a saved state to start from
        self.save_to: Path | None = None  # where to save the state at "ready"
        self.saved = False
        self.state_crc: int | None = None  # the saved file's CRC-32
        self.restore_seconds: float | None = None
        self.save_seconds: float | None = None
        self.state_note = ""  # what happened to saving or restoring, for -v
        # What the run observed, for outcome.classify.
        self._status: int | None = None
        self._ready = False
        self._started: float | None = None
        self._stderr = b""
        self._control = b""
        self._plugin_reason = ""
        self._guest_error = ""
        self._loop: Loop | None = None
        self._live_ram: int | None = None

    # ------------------------------------------------------------ start and stop

    def start(self, extra: tuple[str, ...] = ()) -> None:
        """Start qemu: a cold boot, or a saved state loaded (``restore_from``; raises
        RestoreFailed when it does not load: nothing has run yet then). A VM that is to
        save (``save_to``) runs on RAM in a file, which the save copies out."""
        self.activity.started = time.monotonic()
        fds = list(self.channels.fds().values())
        state = None
        if self.restore_from is not None:
            # qemu reads the file itself: through "exec:cat" (a shell, cat and a pipe)
            # loading took half as long again, and now and then three times as long.
            # One descriptor for both parts (hshelper.qemu.ramfile): the RAM, mapped
            # from the file's start, and the device state after it, read from where
            # the descriptor stands once the capability that leaves RAM out of the
            # stream is set (see _incoming).
            try:
                state = os.open(self.restore_from, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise RestoreFailed(f"cannot open the state: {exc.strerror}") from exc
            try:
                os.lseek(state, self.boot.memory_bytes, os.SEEK_SET)
                ram = ramfile.fd_path(state)
            except OSError as exc:
                os.close(state)
                raise RestoreFailed(str(exc)) from exc
            extra = (*extra, *ram_backend(self.boot.memory_mb, ram, shared=False),
                     "-incoming", "defer")
            fds.append(state)
        elif self.save_to is not None:
            try:
                self._live_ram = ramfile.live_ram(self.save_to.parent, self.boot.memory_bytes)
                ram = ramfile.fd_path(self._live_ram)
            except OSError as exc:
                self._close_live_ram()
                self.save_to = None
                self.state_note = f"no state saved: {exc}"
            else:
                extra = (*extra, *ram_backend(self.boot.memory_mb, ram, shared=True))
                fds.append(self._live_ram)
        try:
            self.proc = process.spawn([*self.argv, *extra], fds)
        except BaseException:
            if state is not None:
                os.close(state)
            self._close_live_ram()
            raise
        self.channels.handed_over()
        if self.restore_from is not None:
            try:
                try:
                    self._incoming(state)
                finally:
                    os.close(state)
                self._await_restore()
            except BaseException:
                # The caller boots another VM with the same disks: this qemu must be
                # gone first (it holds their image locks), and so must its heartbeat.
                self._release()
                raise
        if self.forward_stdin:
            threading.Thread(target=self._pump_stdin, daemon=True).start()
        else:
            # The guest reads /dev/null then; closing tells qemu nobody will write.
            self.channels.ours[guestabi.STDIN].close()

    def _close_live_ram(self) -> None:
        if self._live_ram is not None:
            os.close(self._live_ram)
            self._live_ram = None

    def _incoming(self, fd: int) -> None:
        """Load the device state from ``fd`` (qemu started with ``-incoming defer``)."""
        try:
            self.qmp.execute("migrate-set-capabilities", capabilities=RAM_NOT_IN_STREAM)
            self.qmp.execute("migrate-incoming", uri=f"fd:{fd}")
        except (HshelperError, OSError) as exc:
            raise RestoreFailed(str(exc)) from exc

    def _await_restore(self, timeout: float = 60.0) -> None:
        """Wait until the loaded guest runs (it continues where it said "ready")."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                status = self.qmp.execute("query-status", timeout=timeout).get("status")
                if status == "running":
                    break
                if status == "paused":  # loaded, and waits for us
                    self.qmp.execute("cont")
                    continue
                if status not in ("inmigrate", "prelaunch"):
                    raise RestoreFailed(f"the restored VM is {status}")
                # Still loading: it starts by itself once loaded (argv: no global state).
                # This qemu never ran before, so any RESUME counts, also one that came
                # in the same read as the answer above (on a busy host it often does).
                if not self.qmp.wait_event("RESUME", deadline - time.monotonic(), since=0):
                    if time.monotonic() >= deadline:
                        raise RestoreFailed(f"the VM did not load within {timeout:g} s")
                    raise RestoreFailed("qemu stopped while loading the state")
        except (HshelperError, OSError, RestoreFailed) as exc:
            self.kill()  # also so that its stderr ends, with qemu's own reason last
            err = self.proc.stderr.read().decode(errors="replace").strip() if \
                self.proc and self.proc.stderr else ""
            raise RestoreFailed(f"{exc}: {err.splitlines()[-1]}" if err else str(exc)) \
                from exc
        self.restore_seconds = time.monotonic() - self.activity.started
        self._ready = True  # it said so before it was saved

    def _save(self) -> None:
        """Save the guest as it waits at "ready", then let it go on. A failure only
        means no state is kept: this run continues either way."""
        assert self.save_to is not None
        started = time.monotonic()
        try:
            # The file starts with room for the RAM (holes, filled after the migration);
            # qemu's stream is appended after it.
            with open(self.save_to, "wb") as fh:
                fh.truncate(self.boot.memory_bytes)
            # No bandwidth limit: the default (128 MiB/s) would make saving the slow part.
            self.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            self.qmp.execute("migrate-set-capabilities", capabilities=RAM_NOT_IN_STREAM)
            self.qmp.execute("stop")
            self.qmp.execute("migrate", uri=f"exec:cat >> {shlex.quote(str(self.save_to))}")
            while True:
                status = self.qmp.execute("query-migrate").get("status")
                if status == "completed":
                    self.state_crc = self._write_ram()
                    self.saved = True
                    break
                if status in ("failed", "cancelled") or time.monotonic() - started > 120:
                    self.state_note = f"saving the VM state failed (migration {status})"
                    break
                time.sleep(0.02)
        except (HshelperError, OSError) as exc:
            self.state_note = f"saving the VM state failed: {exc}"
        finally:
            with contextlib.suppress(HshelperError, OSError):
                self.qmp.execute("cont")
        self.save_seconds = time.monotonic() - started

    def _write_ram(self) -> int:
        """Copy the stopped guest's RAM into the state file's start; its CRC-32."""
        assert self.save_to is not None and self._live_ram is not None
        fd = os.open(self.save_to, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = self.boot.memory_bytes
            crc = ramfile.copy_sparse(self._live_ram, fd, size)
            return ramfile.crc_from(fd, size, crc)
        finally:
            os.close(fd)

    def kill(self) -> None:
        process.kill(self.proc)

    def _release(self) -> None:
        """The end of a VM, served to its end or given up before it ran: qemu killed and
        reaped, our ends closed, its watchers (heartbeat) told."""
        self.kill()
        self.channels.close()
        self._close_live_ram()
        self.activity.finished.set()

    def _pump_stdin(self) -> None:
        sock = self.channels.ours[guestabi.STDIN]
        try:
            while chunk := os.read(sys.stdin.fileno(), 65536):
                sock.sendall(chunk)
        except OSError:
            pass
        finally:
            # A closed host end is an EOF for the guest's reader.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    # ------------------------------------------------------------ channel handlers

    def _on_console(self, log) -> Callable[[bytes], None]:
        def handle(data: bytes) -> None:
            log.write(data)
            log.flush()
            if self.verbose and data:
                sys.stderr.buffer.write(data)
                sys.stderr.buffer.flush()
        return handle

    def _on_output(self, stream) -> Callable[[bytes], None]:
        def handle(data: bytes) -> None:
            if data:
                stream.write(data)
                stream.flush()
                self.activity.last_output = time.monotonic()
        return handle

    def _on_control(self, data: bytes) -> None:
        self._control += data
        while b"\n" in self._control:
            line, self._control = self._control.split(b"\n", 1)
            words = line.decode(errors="replace").split()
            if not words:
                continue
            if words[0] == guestabi.READY and not self._ready:
                self._ready = True
                if self.save_to is not None:
                    if guestabi.NOSAVE in words[1:]:
                        self.state_note = "the guest could not reseed its RNG: no state saved"
                    else:
                        self._save()
                self._send_script()
            elif words[0] == guestabi.STARTED and self._started is None:
                self._started = time.monotonic() - self.activity.started
            elif words[0] == guestabi.STATUS and len(words) == 2 and words[1].isdigit():
                self._status = int(words[1])
            elif words[0] == guestabi.ERROR:
                self._guest_error = " ".join(words[1:])

    def _send_script(self) -> None:
        assert self._loop is not None
        script = self.script
        if self.restore_seconds is not None:
            script = restore_prelude(time.time(), os.urandom(32)) + script
        header = f"{guestabi.SCRIPT} {len(script)}\n".encode()
        self._loop.send(self.channels.ours[guestabi.CONTROL], header + script)

    def _on_qmp(self, data: bytes) -> None:
        if data:
            self.qmp.feed(data)

    def _on_stderr(self, data: bytes) -> None:
        self._stderr += data

    def _event(self, event: dict) -> None:
        reason = self.on_event(event) if self.on_event else None
        if reason and not self._plugin_reason:
            self._plugin_reason = reason
        if reason or fatal(event):
            self.kill()

    # ------------------------------------------------------------ the run

    def run(self, script: bytes, limits: Limits, stop: StopRequest) -> outcome.Outcome:
        """Serve the channels until qemu has exited and every channel is drained."""
        assert self.proc is not None and self.proc.stderr is not None
        self.script = script
        loop = self._loop = Loop()
        ours = self.channels.ours
        timed_out, limit = "", None
        with open(self.console_log, "wb") as log:
            try:
                loop.add(ours["console"], self._on_console(log))
                loop.add(ours[guestabi.STDOUT], self._on_output(sys.stdout.buffer))
                loop.add(ours[guestabi.STDERR], self._on_output(sys.stderr.buffer))
                loop.add(ours[guestabi.CONTROL], self._on_control)
                loop.add(ours["qmp"], self._on_qmp)
                loop.add(self.proc.stderr, self._on_stderr)
                if self._ready:  # restored: the guest waits for its script already
                    self._send_script()
                exited_at = None
                while loop.open_count():
                    loop.step(0.2)
                    now = time.monotonic()
                    if not timed_out:
                        timed_out, limit = self._over(limits, now - self.activity.started)
                    if stop.is_set() or timed_out:
                        self.kill()
                    if self.proc.poll() is not None:
                        exited_at = exited_at or now
                        if now - exited_at > DRAIN_SECONDS:
                            break  # something else holds a channel open: stop waiting
            finally:
                loop.close()
                self._release()
        seen = outcome.Observed(
            status=self._status, ready=self._ready, started=self._started,
            elapsed=time.monotonic() - self.activity.started, timed_out=timed_out,
            limit=limit, signal_status=stop.status if stop.is_set() else None,
            returncode=self.proc.returncode,
            qemu_stderr=self._stderr.decode(errors="replace"),
            console=self.console_log.read_text(errors="replace"),
            events=tuple(self.qmp.events), disk_files=self.disk_files,
            plugin_reason=self._plugin_reason, guest_error=self._guest_error)
        return outcome.classify(seen)

    def _over(self, limits: Limits, elapsed: float) -> tuple[str, float | None]:
        """Which limit has run out ("boot", "command" or "") and its length."""
        if self._started is None:
            if limits.boot and elapsed > limits.boot:
                return "boot", limits.boot
        elif limits.command and elapsed - self._started > limits.command:
            return "command", limits.command
        return "", None

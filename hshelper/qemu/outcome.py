"""How a VM run ended, decided from what was observed: a pure function.

The observations are the guest's own reports on the control port, qemu's events on its
control channel, qemu's exit and its stderr, the kernel console, and what the host did
(a timeout, a signal). The order of the checks is the order of trust: what hshelper
itself did, then what qemu says happened (events), then what the guest said, then what
can be read from text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hshelper.errors import EXIT_FAILED, EXIT_TIMEOUT

PANIC = re.compile(r"Kernel panic - not syncing:.*")
# Console lines that say the image itself is bad (truncated or damaged initrd): the
# cache entry must go, so the next run rebuilds it.
IMAGE_DAMAGE = re.compile(r"(No working init found|Initramfs unpacking failed|"
                          r"Failed to execute /init|junk in compressed archive|"
                          r"write error in initramfs)")


@dataclass(frozen=True)
class Observed:
    """Everything known when the VM is gone."""

    status: int | None = None  # the guest's "status N"
    ready: bool = False  # the guest booted ("ready")
    started: float | None = None  # seconds after qemu started when the command began
    elapsed: float = 0.0  # seconds qemu ran
    timed_out: str = ""  # "", "boot" or "command"
    limit: float | None = None  # the limit that ran out
    signal_status: int | None = None  # 128+N when SIGINT/SIGTERM/SIGHUP stopped the run
    returncode: int | None = None  # qemu's exit status (negative: killed by a signal)
    qemu_stderr: str = ""
    console: str = ""
    events: tuple[dict, ...] = ()
    disk_files: dict[str, str] = field(default_factory=dict)  # qemu drive id -> host path
    plugin_reason: str = ""  # a plugin ended the run at a qemu event (hshelper_vm_event)
    guest_error: str = ""  # the guest init's own failure ("error TEXT" on the control port)


@dataclass(frozen=True)
class Outcome:
    """``status`` is the exit status to use; ``reason`` says why when it is not the
    guest command's own; ``image_damaged`` asks the caller to drop the cached image."""

    status: int
    reason: str
    boot_seconds: float | None
    console_tail: str
    image_damaged: bool = False


def _io_error(seen: Observed) -> str | None:
    for event in seen.events:
        if event.get("event") != "BLOCK_IO_ERROR":
            continue
        data = event.get("data", {})
        drive = data.get("device") or data.get("node-name") or "?"
        where = seen.disk_files.get(drive, drive)
        if data.get("nospace"):
            return (f"no space left on device on the host, writing {where} "
                    "(free space there, or put the image elsewhere)")
        if data.get("operation") == "write":
            return f"the host failed to write {where}: {data.get('reason', 'I/O error')}"
    return None


def _panicked(seen: Observed) -> str | None:
    text = PANIC.search(seen.console)
    reported = any(e.get("event") == "GUEST_PANICKED" for e in seen.events)
    by = " (reported by qemu's pvpanic device)" if reported else ""
    if text:
        return f"guest kernel panic: {text.group(0).strip()}{by}"
    if reported:
        return f"guest kernel panic{by}; see the kernel log"
    return None


def classify(seen: Observed) -> Outcome:
    tail = "\n".join(seen.console.splitlines()[-25:])
    boot = seen.started

    def failed(reason: str, status: int = EXIT_FAILED, damaged: bool = False) -> Outcome:
        return Outcome(status, reason, boot, tail, damaged)

    if seen.signal_status is not None:
        return failed("interrupted", seen.signal_status)
    if seen.timed_out == "boot":
        return failed(f"the VM did not finish booting within {seen.limit:g} s (the command "
                      "never started; see the kernel log)")
    if seen.timed_out == "command":
        ran = seen.elapsed - (seen.started or 0.0)
        return failed(f"timed out: the command ran {ran:.0f} s, the limit is {seen.limit:g} s",
                      EXIT_TIMEOUT)
    if seen.plugin_reason:
        return failed(seen.plugin_reason)
    io_error = _io_error(seen)
    if io_error:
        return failed(io_error)
    if seen.guest_error:
        return failed(f"in the guest: {seen.guest_error}")
    if seen.status is not None:
        return Outcome(seen.status, "", boot, tail)
    panic = _panicked(seen)
    damaged = bool(IMAGE_DAMAGE.search(seen.console))
    if panic:
        return failed(panic, damaged=damaged)
    if seen.returncode is not None and seen.returncode < 0:
        return failed(f"qemu was killed by signal {-seen.returncode} (from outside "
                      "hshelper)")
    messages = seen.qemu_stderr.strip().splitlines()
    if messages and seen.returncode:
        return failed(f"qemu failed: {messages[-1]}")
    stops = [e for e in seen.events if e.get("event") == "STOP"]
    if stops:
        return failed("qemu paused the VM (a STOP event with no known cause)")
    return failed(f"the guest stopped without reporting an exit status (qemu exit "
                  f"{seen.returncode})", damaged=damaged)

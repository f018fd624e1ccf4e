"""How a run ended: the classification over what was observed (pure)."""

from __future__ import annotations

from hshelper.qemu.outcome import Observed, classify

DISK_FULL = {"event": "BLOCK_IO_ERROR", "data": {
    "device": "hshdisk0", "operation": "write", "action": "stop", "nospace": True,
    "reason": "No space left on device"}}


def test_the_guest_status_passes_through():
    out = classify(Observed(status=7, ready=True, started=1.5))
    assert (out.status, out.reason, out.boot_seconds) == (7, "", 1.5)


def test_a_signal_wins_over_everything():
    out = classify(Observed(status=0, signal_status=143, events=(DISK_FULL,)))
    assert (out.status, out.reason) == (143, "interrupted")


def test_boot_and_command_timeouts_say_which():
    boot = classify(Observed(timed_out="boot", limit=30.0, elapsed=30.2))
    assert boot.status == 125 and "did not finish booting within 30 s" in boot.reason
    assert "never started" in boot.reason
    cmd = classify(Observed(timed_out="command", limit=5.0, started=4.0, elapsed=9.3))
    assert cmd.status == 124 and "the command ran 5 s, the limit is 5 s" in cmd.reason


def test_a_full_host_disk_names_the_file():
    out = classify(Observed(events=(DISK_FULL,), disk_files={"hshdisk0": "/b/out.img"},
                            returncode=-9))
    assert out.status == 125
    assert "no space left on device on the host, writing /b/out.img" in out.reason


def test_a_host_write_error_that_is_not_enospc():
    event = {"event": "BLOCK_IO_ERROR", "data": {"device": "hshdisk1", "operation": "write",
                                                  "action": "stop", "nospace": False,
                                                  "reason": "Input/output error"}}
    out = classify(Observed(events=(event,)))
    assert "failed to write hshdisk1: Input/output error" in out.reason


def test_panic_from_console_or_event():
    text = classify(Observed(console="x\nKernel panic - not syncing: Attempted to kill init!"))
    assert text.status == 125 and "Attempted to kill init" in text.reason
    event = classify(Observed(events=({"event": "GUEST_PANICKED", "data": {}},)))
    assert "pvpanic" in event.reason
    both = classify(Observed(console="Kernel panic - not syncing: x",
                             events=({"event": "GUEST_PANICKED", "data": {}},)))
    assert both.reason == ("guest kernel panic: Kernel panic - not syncing: x "
                           "(reported by qemu's pvpanic device)")


def test_an_image_that_cannot_boot_is_marked_damaged():
    console = ("Initramfs unpacking failed: junk in compressed archive\n"
               "Kernel panic - not syncing: No working init found.")
    out = classify(Observed(console=console))
    assert out.image_damaged and out.status == 125
    assert not classify(Observed(console="Kernel panic - not syncing: Oops")).image_damaged


def test_qemu_killed_from_outside():
    out = classify(Observed(returncode=-9))
    assert "qemu was killed by signal 9" in out.reason


def test_qemu_error_message_and_silent_end():
    err = classify(Observed(returncode=1, qemu_stderr="warn\nqemu: could not open disk\n"))
    assert err.reason == "qemu failed: qemu: could not open disk"
    silent = classify(Observed(returncode=0))
    assert "without reporting an exit status" in silent.reason


def test_a_plugin_reason_and_an_unexplained_pause():
    assert classify(Observed(plugin_reason="quota hit")).reason == "quota hit"
    paused = classify(Observed(events=({"event": "STOP"},), returncode=-9))
    assert "killed by signal" in paused.reason  # what killed it is known: said first
    paused = classify(Observed(events=({"event": "STOP"},), returncode=0))
    assert "paused the VM" in paused.reason


def test_the_guest_inits_own_failure_is_said():
    out = classify(Observed(status=125, guest_error="cannot enter /x in the guest"))
    assert out.status == 125 and out.reason == "in the guest: cannot enter /x in the guest"

"""Saved VM states, for real: the first run saves the booted guest, later runs restore
it; restored guests are unique (RNG, UUIDs) and on time; a state that is damaged, made
by another qemu or for another machine shape is never used and the run boots cold."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import chroot
import pytest

pytestmark = [
    pytest.mark.slow, pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("HSHELPER_RUN_SAVED_STATES") == "0",
                       reason="saved VM states are switched off for this whole run"),
]


def helper_run(root, *argv, cwd=chroot.HOME, **kwargs):
    return chroot.run(root, ["helper-run", "-v", *argv], cwd=cwd, **kwargs)


def states(root) -> Path:
    return root / "home/builder/.cache/hshelper/states"


def state_files(root) -> list[Path]:
    return sorted(states(root).glob("*.state"))


def fresh(root) -> None:
    """No saved state: the next run boots and saves one."""
    shutil.rmtree(states(root), ignore_errors=True)


def run_ok(root, *argv, **kwargs):
    proc = helper_run(root, *argv, **kwargs)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode(), proc.stderr.decode()


def test_first_run_saves_then_runs_restore(root):
    fresh(root)
    _, err = run_ok(root, "true")
    assert "saving the state at ready" in err and "saved the VM state" in err
    assert len(state_files(root)) == 1
    # The sleep: a restored guest's timers must fire (on ppc64le and riscv64 they did
    # not, and such a run hung until its timeout).
    out, err = run_ok(root, "--timeout", "60", "sh", "-c", "sleep 0.5; echo restored-ok")
    assert out == "restored-ok\n" and "restored the saved VM state" in err


def test_restored_guests_are_unique_and_on_time(root):
    fresh(root)
    work = chroot.fresh_dir(root, "unique")
    run_ok(root, "true")
    script = ("truncate -s 16M fs.img && mkfs.ext4 -q -F fs.img && "
              "blkid -s UUID -o value fs.img && cat /proc/sys/kernel/random/uuid && "
              "date +%s")
    seen = []
    for _ in range(2):
        out, err = run_ok(root, "sh", "-c", script, cwd=work)
        host_now = time.time()
        assert "restored the saved VM state" in err
        fs_uuid, rng_uuid, guest_now = out.split()
        assert abs(int(guest_now) - host_now) <= 2, (guest_now, host_now)
        seen.append((fs_uuid, rng_uuid))
    assert seen[0][0] != seen[1][0], "two restored runs made the same filesystem UUID"
    assert seen[0][1] != seen[1][1], "two restored runs read the same random UUID"


def test_disks_and_shares_arrive_after_the_restore(root, tmp_path):
    fresh(root)
    work = chroot.fresh_dir(root, "slots")
    extra = chroot.fresh_dir(root, "slots-extra")
    (root / extra.lstrip("/") / "note.txt").write_text("from the extra share\n")
    run_ok(root, "true")
    script = ("ls /sys/block | grep vd; cat /sys/block/vda/size; "
              "printf 'label: gpt\\n,,L\\n' | sfdisk -q $HSHELPER_DISK_OUT && "
              "mkfs.ext4 -q ${HSHELPER_DISK_OUT}1 && cat /mnt/x/note.txt && echo hi > here.txt")
    out, err = run_ok(root, "--disk", "out.img,size=64M,name=out",
                      "--share", f"{extra}:/mnt/x:ro", "sh", "-c", script, cwd=work)
    assert "restored the saved VM state" in err
    lines = out.splitlines()
    assert lines[0] == "vda" and lines[1] == str(64 * 2048), out  # no placeholder disk
    assert "from the extra share" in out
    image = root / work.lstrip("/") / "out.img"
    dump = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True)
    assert "label: gpt" in dump.stdout
    assert (root / work.lstrip("/") / "here.txt").read_text() == "hi\n"


def test_a_damaged_state_falls_back_to_a_cold_boot(root):
    fresh(root)
    run_ok(root, "true")
    [state] = state_files(root)
    with open(state, "r+b") as fh:
        fh.truncate(state.stat().st_size // 2)
    out, err = run_ok(root, "sh", "-c", "echo cold")
    assert out == "cold\n"
    assert "the saved state was damaged" in err and "saved the VM state" in err


def test_the_state_holds_the_ram_and_a_change_there_is_caught(root):
    """The state file starts with the guest's RAM (mostly holes), then qemu's device
    state. Changed in place (same size: only its stamp and CRC tell), it is never
    mapped: the run boots cold and saves a good one."""
    fresh(root)
    run_ok(root, "true")
    [state] = state_files(root)
    assert state.stat().st_size > 512 << 20  # the guest's memory, then the stream
    assert state.stat().st_blocks * 512 < 256 << 20
    with open(state, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"\xff" * 4096)
    out, err = run_ok(root, "sh", "-c", "echo cold-too")
    assert out == "cold-too\n"
    assert "its content changed since it was written" in err, err
    assert "saved the VM state" in err
    out, err = run_ok(root, "sh", "-c", "echo restored")
    assert out == "restored\n" and "restored the saved VM state" in err


def test_saving_leaves_no_stray_files(root):
    fresh(root)
    shm = set(os.listdir("/dev/shm"))
    run_ok(root, "true")
    names = sorted(p.name for p in states(root).iterdir())
    [state] = state_files(root)
    assert [n for n in names if n.startswith(state.name)] == [
        state.name, state.name + ".lock", state.name + ".sum"]
    assert not [n for n in names if n.startswith(".")], names
    assert set(os.listdir("/dev/shm")) == shm


def test_a_state_that_does_not_load_is_removed_and_the_run_boots(root):
    """Garbage with a valid record: the size+CRC check passes, qemu refuses it."""
    fresh(root)
    run_ok(root, "true")
    [state] = state_files(root)
    state.write_bytes(b"QEVM" + b"\0" * 4096)
    record = state.with_name(state.name + ".sum")
    import zlib

    record.write_text(json.dumps({"size": 4100, "crc32": zlib.crc32(state.read_bytes())}))
    out, err = run_ok(root, "sh", "-c", "echo cold-again")
    assert out == "cold-again\n"
    assert "did not load" in err and "it was removed" in err
    assert "saved the VM state" in err  # and a good one replaces it


# helper-run as installed in the root, with one of hshelper's own functions changed
# first: the way to give a real qemu a fault that cannot be made from outside.
WITH_FAULT = """import sys
sys.path.insert(0, "/opt/hshelper")
from hshelper.qemu import qmp, vm
{fault}
from hshelper.cli import helper_run_main
sys.exit(helper_run_main())
"""

# The load never ends: migrate-incoming is not sent, so qemu waits in "inmigrate" (as
# one whose load stalls would), and the wait for it is cut to 2 s.
STALLED_LOAD = """vm.VM._incoming = lambda self, fd: None
vm.VM._await_restore.__defaults__ = (2.0,)"""

# qemu loads the state for real (the run's disk is active in it, locked), then the run
# gives up on it anyway: what the missed RESUME (below) made the 60 s wait do.
GIVEN_UP = """await_restore = vm.VM._await_restore
def given_up(self, timeout=60.0):
    await_restore(self, timeout)
    raise vm.RestoreFailed("given up on after it loaded")
vm.VM._await_restore = given_up"""

# hshelper reads its control channel late (a busy host): qemu's answer to query-status
# ("inmigrate") and the RESUME after it arrive in one read.
LATE_READER = """import time
send, pump, last = qmp.QMP.send, qmp.QMP.pump, []
def late_send(self, command, **arguments):
    last[:] = [command]
    return send(self, command, **arguments)
def late_pump(self, timeout):
    if last == ["query-status"]:
        time.sleep(1.0)
    return pump(self, timeout)
qmp.QMP.send, qmp.QMP.pump = late_send, late_pump"""


def helper_run_with(root, fault, *argv, cwd=chroot.HOME):
    return chroot.run(root, ["python3", "-c", WITH_FAULT.format(fault=fault), "-v", *argv],
                      cwd=cwd)


@pytest.mark.parametrize("fault, reason", [
    (STALLED_LOAD, "the VM did not load within 2 s"),
    (GIVEN_UP, "given up on after it loaded"),
], ids=["stalled", "given-up"])
def test_a_restore_that_fails_gives_way_to_a_boot_with_the_same_disk(root, fault, reason):
    """Either way the run boots, with the same disk. A qemu that has loaded the state
    holds the disk's image lock (one still loading does not: qemu takes it once the
    load completes), so it must be gone before the boot opens the disk. (It was not:
    the boot failed with qemu's 'Is another process using the image', seen on s390x
    under load; the given-up case fails that way on the old code.)"""
    fresh(root)
    work = chroot.fresh_dir(root, "failed-restore")
    run_ok(root, "true")
    script = "printf 'label: gpt\\n,,L\\n' | sfdisk -q $HSHELPER_DISK_OUT && echo made"
    proc = helper_run_with(root, fault, "--disk", "out.img,size=64M,name=out",
                           "--timeout", "120", "sh", "-c", script, cwd=work)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout == b"made\n"
    assert f"the saved VM state did not load ({reason})" in err, err
    dump = subprocess.run(["sfdisk", "-d", str(root / work.lstrip("/") / "out.img")],
                          capture_output=True, text=True)
    assert "label: gpt" in dump.stdout
    assert chroot.wait_no_qemu(root)


def test_a_restore_read_late_is_not_mistaken_for_a_stalled_one(root):
    """The RESUME that came in the same read as an answer counts (it was dropped, and
    the run waited 60 s for an event it already had, then booted cold)."""
    fresh(root)
    run_ok(root, "true")
    started = time.monotonic()
    proc = helper_run_with(root, LATE_READER, "sh", "-c", "echo late-ok")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and proc.stdout == b"late-ok\n", err
    assert "restored the saved VM state" in err, err
    assert time.monotonic() - started < 40, err


# A guest whose RNG reseed fails at boot (hshelper/reseed.py's program, stood in for by
# a script that fails as the ioctl would on a kernel without RNDRESEEDCRNG).
FAILING_RESEED = b"""\
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, File


@hookimpl
def hshelper_image_contents():
    return Contents(files=(File("/hshelper/reseed", data=b"#!/bin/sh\\nexit 25\\n",
                                mode=0o755),))
"""


def test_a_guest_that_cannot_reseed_saves_no_state(root):
    fresh(root)
    work = chroot.fresh_dir(root, "noreseed")
    host = root / work.lstrip("/")
    (host / "noreseed.py").write_bytes(FAILING_RESEED)
    (host / "hshelper.toml").write_text('[plugins]\nload = ["noreseed.py"]\n')
    for _ in range(2):
        out, err = run_ok(root, "sh", "-c", "echo still-runs", cwd=work)
        assert out == "still-runs\n"
        assert "could not reseed its RNG: no state saved" in err, err
        assert "restored" not in err
    assert state_files(root) == []


def test_another_qemu_or_memory_size_never_loads_the_state(root):
    fresh(root)
    run_ok(root, "true")
    assert len(state_files(root)) == 1
    _, err = run_ok(root, "--memory", "384", "true")
    assert "no saved state" in err  # another machine shape: another key
    assert len(state_files(root)) == 2
    # Another qemu version (faked: the version qemu reported is remembered per binary).
    memos = list(states(root).glob("qemu-*.version"))
    assert memos, "the qemu version qemu reported is remembered beside the states"
    for memo in memos:
        memo.write_text("QEMU emulator version 99.0 (faked)")
    _, err = run_ok(root, "true")
    assert "no saved state" in err and "saved the VM state" in err
    assert len(state_files(root)) == 3


def test_saved_states_can_be_turned_off(root):
    fresh(root)
    _, err = run_ok(root, "--set", "run.saved_states=false", "true")
    assert "saved" not in err and not state_files(root)


def test_clean_removes_states_and_info_shows_their_size(root):
    fresh(root)
    run_ok(root, "true")
    info = chroot.run(root, ["hshelper", "info"])
    assert info.returncode == 0, info.stderr
    assert re.search(r"states \d+\.\d MB", info.stdout.decode())
    clean = chroot.run(root, ["hshelper", "clean"])
    assert clean.returncode == 0 and b"states" in clean.stdout
    assert not states(root).exists()

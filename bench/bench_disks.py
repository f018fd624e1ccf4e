"""How a disk reaches a restored guest: the ways issue 14 asked to measure (x86_64).

    python3 bench/bench_disks.py [--rounds N]

A restored guest must see the run's disk, not whatever the saved machine had. Four ways,
each timed as a whole restored ``helper-run`` that waits for the disk and writes a GPT
on it (``sfdisk``), rounds alternating the ways:

- ``blk-slot``: what hshelper does. virtio-blk devices at fixed addresses are in the
  saved machine (placeholders at save time) and point at the run's files when qemu
  starts; the driver is loaded after the restore and binds only the run's disks.
- ``scsi-slot``: the same with a virtio-scsi controller and a ``scsi-hd`` behind it;
  the virtio_scsi and sd_mod modules are loaded after the restore and scan the bus.
- ``scsi-hot``: the saved machine has only the controller; the disk is hot-added on
  qemu's control channel once the restored guest runs (``blockdev-add`` +
  ``device_add scsi-hd``), which virtio-scsi announces to the guest itself.
- ``blk-hot``: a virtio-blk-pci device hot-added the same way (ACPI PCI hotplug).

Besides the wall time, the guest reports how long its command waited for the disk
(``/proc/uptime`` before loading the driver and once the disk is there). The hot-add
ways need the control channel; hshelper's own is busy with the run, so the experiment
adds a second QMP monitor (a plugin written into the work directory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import buildroots  # noqa: E402

from bench import tool  # noqa: E402

WAYS = ("blk-slot", "scsi-slot", "scsi-hot", "blk-hot")

# The experiment's plugin: the SCSI modules in the image, the devices of each way, a
# second QMP monitor and, for the hot-add ways, a thread that plugs the disk in as soon
# as the restored guest runs. Its settings come from the environment.
PLUGIN = r'''
import os
import socket
import threading
import time

from hshelper.hookspecs import hookimpl
from hshelper.model import Contents
from hshelper.qemu.qmp import QMP

WAY = os.environ["BENCH_WAY"]
DISK = os.environ["BENCH_DISK"]
MONITOR = os.environ["BENCH_QMP"]
CONTROLLER = ["-device", "virtio-scsi-pci,id=bscsi,addr=0x18"]


@hookimpl
def hshelper_image_contents():
    return Contents(modules=("virtio_scsi", "sd_mod", "virtio_blk"))


@hookimpl
def hshelper_qemu_args():
    args = ["-chardev", f"socket,id=bmon,path={MONITOR},server=on,wait=off",
            "-mon", "chardev=bmon,mode=control"]
    if WAY == "scsi-slot":
        args += CONTROLLER + [
            "-drive", f"file={DISK},if=none,id=bsd0,format=raw",
            "-device", "scsi-hd,drive=bsd0,bus=bscsi.0,scsi-id=0,lun=0"]
    elif WAY == "scsi-hot":
        args += CONTROLLER
    return args


def _hot_add():
    deadline = time.monotonic() + 60
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(MONITOR)
            break
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
    qmp = QMP(sock)
    while qmp.execute("query-status").get("status") != "running":
        time.sleep(0.005)
    qmp.execute("blockdev-add", **{"driver": "raw", "node-name": "bhot",
                                   "file": {"driver": "file", "filename": DISK}})
    if WAY == "scsi-hot":
        qmp.execute("device_add", driver="scsi-hd", drive="bhot", bus="bscsi.0", id="bhd")
    else:
        qmp.execute("device_add", driver="virtio-blk-pci", drive="bhot", id="bhd",
                    addr="0x18")
    sock.close()


@hookimpl(hookwrapper=True)
def hshelper_run_vm(vm):
    # Not in the run that boots and saves: the state must not hold the hot-added disk.
    if WAY.endswith("-hot") and vm.restore_from is not None:
        threading.Thread(target=_hot_add, daemon=True).start()
    yield
'''

# The guest side: load the way's driver, wait for the disk, partition it. Prints the
# uptime before, once the disk is there, and after sfdisk.
GUEST = r'''
t0=$(cut -d" " -f1 /proc/uptime)
case $1 in
  blk-slot) dev=$HSHELPER_DISK_OUT ;;
  scsi-*) modprobe virtio_scsi; modprobe sd_mod; dev=/dev/sda ;;
  blk-hot)
    # As the disks plugin does: no autoprobe, so the placeholder slots never bind.
    echo 0 >/sys/bus/virtio/drivers_autoprobe; modprobe virtio_blk; dev=/dev/vda ;;
esac
until [ -b "$dev" ] && [ "$(blockdev --getsize64 "$dev")" = 67108864 ]; do
  [ "$1" != blk-hot ] || for v in /sys/bus/pci/devices/*:00:18.0/virtio*; do
    [ -e "$v" ] && [ ! -e "$v/driver" ] && echo "${v##*/}" >/sys/bus/virtio/drivers/virtio_blk/bind
  done
  sleep 0.01
done
t1=$(cut -d" " -f1 /proc/uptime)
printf 'label: gpt\n,,L\n' | sfdisk -q "$dev"
t2=$(cut -d" " -f1 /proc/uptime)
echo "$t0 $t1 $t2"
'''


def one_run(root: Path, work: Path, cache: Path, way: str, index: int) -> tuple[float, float]:
    """One restored run of ``way``: (wall seconds, seconds the guest waited for the disk)."""
    disk = work / f"disk-{index}.img"
    with open(disk, "wb") as fh:
        fh.truncate(64 << 20)
    monitor = work / f"qmp-{index}.sock"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), BENCH_WAY=way, BENCH_DISK=str(disk),
               BENCH_QMP=str(monitor))
    argv = [tool("helper-run"), "--sysroot", str(root), "--accel", "tcg", "--no-share-cwd",
            "--quiet", "--timeout", "60", "--set", "run.saved_states=true"]
    if way == "blk-slot":
        argv += ["--disk", f"{disk},name=out"]
    argv += ["sh", "-c", GUEST if index else "true", "sh", way]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{way}: helper-run failed ({proc.returncode}):\n{proc.stderr}")
    if not index:  # the warm-up: it booted and saved the way's state
        return wall, 0.0
    t0, t1, _ = (float(x) for x in proc.stdout.split())
    dump = subprocess.run(["sfdisk", "-d", str(disk)], capture_output=True, text=True)
    if "label: gpt" not in dump.stdout:
        raise SystemExit(f"{way}: no GPT on the disk after the run")
    disk.unlink()
    monitor.unlink(missing_ok=True)
    return wall, t1 - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = buildroots.ensure_root("bookworm")
    with tempfile.TemporaryDirectory(prefix="bench-disks.") as tmp:
        work, cache = Path(tmp) / "work", Path(tmp) / "cache"
        work.mkdir()
        (work / "benchdisks.py").write_text(PLUGIN)
        (work / "hshelper.toml").write_text('[plugins]\nload = ["benchdisks.py"]\n')
        for way in WAYS:  # the first run of each way (true) boots and saves its state
            one_run(root, work, cache, way, 0)
        walls: dict[str, list[float]] = {w: [] for w in WAYS}
        waits: dict[str, list[float]] = {w: [] for w in WAYS}
        for index in range(1, args.rounds + 1):
            for way in WAYS:
                wall, wait = one_run(root, work, cache, way, index)
                walls[way].append(wall)
                waits[way].append(wait)
    base = statistics.median(walls["blk-slot"])
    print(f"{'way':10} {'run (median)':>12} {'vs blk-slot':>11} {'disk wait':>10}")
    for way in WAYS:
        wall = statistics.median(walls[way])
        print(f"{way:10} {wall:11.2f}s {wall / base:10.2f}x "
              f"{statistics.median(waits[way]):9.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

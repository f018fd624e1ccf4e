"""Helper VMs per architecture, against the raw boot of the same kernel (issue 12).

    python3 bench/bench_arch.py [--rounds N] [--arch NAME ...] [--cpus]

For each foreign test build root (arm64, ppc64el, s390x, riscv64, i386, armhf; cached
by tests/buildroots.py) and the x86_64 one: ``helper-run --sysroot ROOT true`` under TCG,
booted (saved states off: a cold boot, as a build's first step pays it) and restored from
its saved VM state (every later step), against the floor:
the same kernel file as installed, booted raw by the same qemu with the machine table's
machine and CPU model and a tiny initrd (busybox and an init that powers off). Rounds
alternate candidates and floor; medians and their ratios are reported (goal <= 1.0x).

``--cpus`` also times the floor with each candidate TCG CPU model of an architecture,
which is how the machine table's choice was made (aarch64: pointer authentication is
what makes ``max`` slow).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import buildroots  # noqa: E402

from hshelper import cpio, elf, rootpath  # noqa: E402
from hshelper.qemu import machines  # noqa: E402

ROOTS = {"x86_64": "bookworm", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x",
         "riscv64": "riscv64", "i686": "i386", "armv7l": "armhf"}
CPU_CANDIDATES = {
    "aarch64": ["max", "max,pauth-impdef=on", "max,pauth=off", "cortex-a57"],
    "x86_64": ["max", "max,erms=off,fsrm=off"],
    "riscv64": ["rv64", "max"],
    "ppc64le": ["power9", "power10"],
    "s390x": ["max", "qemu"],
    "i686": ["max", "max,erms=off,fsrm=off"],
    "armv7l": ["cortex-a15", "max"],
}


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def timed(argv: list[str], **kwargs) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   **kwargs)
    return time.monotonic() - start


def tiny_initrd(root: Path, dest: Path) -> None:
    """The root's busybox with its libraries, and an init that powers off."""
    busybox = next(p for p in ("/bin/busybox", "/usr/bin/busybox")
                   if (root / p.lstrip("/")).exists())
    closure = elf.elf_closure(root, [busybox])
    entries, dirs = [], set()
    for guest in closure.files:
        real = rootpath.resolve(root, guest).host
        target = guest if guest != busybox else "/bin/busybox"
        parent = os.path.dirname(target)
        while parent not in ("/", "") and parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
        entries.append(cpio.regular(target.lstrip("/"), real.read_bytes(), 0o755))
    entries += [cpio.directory(d.lstrip("/")) for d in dirs | {"/proc", "/dev"}]
    entries.append(cpio.chardev("dev/console", 5, 1))
    entries.append(cpio.regular("init", b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n",
                                0o755))
    dest.write_bytes(cpio.write_archive(sorted(entries, key=lambda e: e.name), 0))


def floor_argv(machine: machines.Machine, kernel: Path, initrd: Path, cpu: str) -> list[str]:
    return [machine.qemu, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"{machine.machine_tcg},accel=tcg", "-cpu", cpu, "-m", "512",
            "-smp", "1", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console={machine.console} quiet panic=-1 rdinit=/init",
            "-serial", "null"]


def bench_arch(arch: str, rounds: int, cpus: bool) -> dict:
    machine = machines.lookup(arch)
    root = buildroots.ensure_root(ROOTS[arch])
    kernel = sorted((root / "boot").glob("vmlinu*"))[-1]
    with tempfile.TemporaryDirectory(prefix="hshelper-bench-arch-") as tmp:
        work = Path(tmp)
        cold_env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"),
                        HSHELPER_RUN_SAVED_STATES="0")
        warm_env = dict(cold_env, HSHELPER_RUN_SAVED_STATES="1")
        run = [tool("helper-run"), "--sysroot", str(root), "--accel", "tcg",
               "--no-share-cwd", "-q", "true"]
        subprocess.run(run, check=True, env=cold_env, cwd=work)  # build the image once
        subprocess.run(run, check=True, env=warm_env, cwd=work)  # and save the VM state
        tiny_initrd(root, work / "tiny.cpio")
        floor = floor_argv(machine, kernel, work / "tiny.cpio", machine.tcg_cpu)
        ours, restored, raw = [], [], []
        for _ in range(rounds):
            ours.append(timed(run, env=cold_env, cwd=work))
            restored.append(timed(run, env=warm_env, cwd=work))
            raw.append(timed(floor))
        result = {"arch": arch, "cpu": machine.tcg_cpu, "run_true_s": statistics.median(ours),
                  "restored_s": statistics.median(restored), "floor_s": statistics.median(raw)}
        result["ratio"] = result["run_true_s"] / result["floor_s"]
        result["restored_ratio"] = result["restored_s"] / result["floor_s"]
        result["restores"] = machine.restores  # else the "restored" runs booted too
        if cpus:
            result["floor_by_cpu_s"] = {}
            for cpu in CPU_CANDIDATES.get(arch, []):
                argv = floor_argv(machine, kernel, work / "tiny.cpio", cpu)
                try:
                    seconds = statistics.median(timed(argv) for _ in range(rounds))
                except subprocess.CalledProcessError:
                    seconds = None  # this qemu or kernel does not take that model
                result["floor_by_cpu_s"][cpu] = seconds
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", action="append", choices=sorted(ROOTS))
    parser.add_argument("--cpus", action="store_true", help="also time each CPU model")
    args = parser.parse_args()
    # Byte-compiled, as installed packages are: with PYTHONDONTWRITEBYTECODE set and a
    # changed tree, every run would compile hshelper first (about 65 ms).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "hshelper"),
                    str(HERE.parent / "plugins")], check=True, stdout=subprocess.DEVNULL)
    results = []
    for arch in args.arch or list(ROOTS):
        r = bench_arch(arch, args.rounds, args.cpus)
        results.append(r)
        print(f"{arch:8} helper-run true booted {r['run_true_s']:.2f} s = {r['ratio']:.2f}x, "
              f"{'restored' if r['restores'] else 'second (no restores here)'} "
              f"{r['restored_s']:.2f} s = {r['restored_ratio']:.2f}x the raw boot of "
              f"the same kernel ({r['floor_s']:.2f} s, -cpu {r['cpu']}); goal <= 1.0x",
              flush=True)
        for cpu, seconds in r.get("floor_by_cpu_s", {}).items():
            took = f"{seconds:.2f} s" if seconds is not None else "does not boot"
            print(f"{'':8}   raw boot with -cpu {cpu}: {took}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

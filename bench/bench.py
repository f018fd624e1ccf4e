"""hshelper's benchmark: every number next to a baseline measured in the same run.

    python3 bench/bench.py [--rounds N] [--skip-run]

Build (issue 2), in the cached "bookworm" test build root:
  cold   ``hshelper build`` with an empty cache, against the floor of writing the same
         files with GNU cpio and compressing them with zstd -3 (no planning, no closure);
  warm   a cache hit, against starting the same Python and importing hshelper;
  size   the initrd, compressed as built (target: under 6 MB for base plus disk tools).
Run (issues 3 and 14):
  ``helper-run true`` under TCG, restored from its saved VM state (the default) and
  booted cold (saved states off), against the VM floor: the same kernel, as installed,
  booted by qemu with a tiny initrd (busybox and an init that powers off); and against
  the PVH floor: hshelper's unpacked vmlinux booted the same way (goal for the restored
  run: under 0.5 s). Restored runs are timed twice a round: after the host was idle for
  IDLE_S seconds, and at once after that (back to back, as a recipe's steps run). On a
  VM host that hands freed memory back to its hypervisor (virtio-balloon free page
  reporting, as on the CI machine) loading a state after an idle spell faults that
  memory back in and takes about three times as long.

Machines here are noisy, so rounds alternate candidate and baseline and the report gives
medians and their ratios; absolute seconds are printed for reference only.
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

from hshelper import cpio  # noqa: E402

TARGETS = {"cold_s": 1.5, "warm_s": 0.1, "size_mb": 6.0}


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def build_json(root: Path, cache: Path, *extra: str) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    proc = subprocess.run([tool("hshelper"), "build", "--sysroot", str(root), "--json",
                           *extra], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout)


def timed(argv: list[str], **kwargs) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.monotonic() - start


def cpio_floor(root: Path, manifest: Path, work: Path) -> float:
    """GNU cpio + zstd -3 over the files the manifest lists (their build-root copies)."""
    files = []
    for line in manifest.read_text().splitlines():
        item = json.loads(line)
        source = root / item["path"].lstrip("/")
        if item["type"] == "file" and source.is_file():
            files.append(item["path"].lstrip("/"))
    listing = work / "files.txt"
    listing.write_text("\n".join(files) + "\n")
    out = work / "floor.cpio.zst"
    start = time.monotonic()
    with open(listing) as names, open(out, "wb") as sink:
        cp = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, stdin=names,
                              stdout=subprocess.PIPE)
        subprocess.run(["zstd", "-q", "-3", "-T0", "-c"], stdin=cp.stdout, stdout=sink,
                       check=True)
        cp.wait()
    return time.monotonic() - start


def bench_build(root: Path, rounds: int) -> dict:
    cold, warm, floor, startup = [], [], [], []
    size = None
    with tempfile.TemporaryDirectory(prefix="hshelper-bench-") as tmp:
        work = Path(tmp)
        for n in range(rounds):
            cache = work / f"cache{n}"
            first = build_json(root, cache)
            assert not first["cached"], "a fresh cache must miss"
            cold.append(first["seconds"])
            second = build_json(root, cache)
            assert second["cached"], "an unchanged build must hit the cache"
            warm.append(second["seconds"])
            size = first["size"]
            manifest = Path(first["initrd"]).with_name("manifest.json")
            floor.append(cpio_floor(root, manifest, work))
            startup.append(in_process_import_time())
    return {"cold_s": statistics.median(cold), "cold_floor_s": statistics.median(floor),
            "warm_s": statistics.median(warm), "import_s": statistics.median(startup),
            "size_mb": size / 1e6}


def in_process_import_time() -> float:
    """What a process pays to import hshelper's CLI: the baseline for a warm build."""
    code = ("import time; t = time.monotonic(); import hshelper.cli, hshelper.initrd; "
            "print(time.monotonic() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=HERE.parent)
    return float(out.stdout)


def tiny_initrd(root: Path, dest: Path) -> None:
    """busybox, its libraries and an init that powers off: the smallest useful guest."""
    entries = [cpio.directory(d) for d in ("bin", "lib", "lib64", "proc",
                                           "lib/x86_64-linux-gnu")]
    entries.append(cpio.chardev("dev/console", 5, 1))
    for rel in ("usr/bin/busybox", "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libresolv.so.2", "lib64/ld-linux-x86-64.so.2"):
        src = root / rel
        data = src.read_bytes() if src.exists() else (root / "usr" / rel).read_bytes()
        entries.append(cpio.regular(rel.replace("usr/bin", "bin"), data, 0o755))
    init = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"
    entries.append(cpio.regular("init", init, 0o755))
    dest.write_bytes(cpio.write_archive(sorted(entries, key=lambda e: e.name), 0))


IDLE_S = 5.0


def bench_run(root: Path, rounds: int) -> dict:
    ours, floor, restored, idle = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="hshelper-bench-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
        cold_env = dict(env, HSHELPER_RUN_SAVED_STATES="0")
        run = [tool("helper-run"), "--sysroot", str(root), "--accel", "tcg", "--no-share-cwd",
               "true"]
        # Warm the image and the PVH kernel, and save the VM state.
        subprocess.run(run, check=True, env=env)
        kernels = list((work / "cache/hshelper/kernels").glob("*/vmlinux"))
        installed = str(next((root / "boot").glob("vmlinuz-*")))
        pvh = str(kernels[0]) if kernels else installed
        tiny_initrd(root, work / "tiny.cpio")

        def raw(kernel: str) -> list[str]:
            return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
                    "-machine", "pc,accel=tcg", "-cpu", "max", "-m", "512", "-smp", "1",
                    "-no-reboot", "-kernel", kernel, "-initrd", str(work / "tiny.cpio"),
                    "-append", "console=ttyS0 quiet panic=-1 rdinit=/init", "-serial", "null"]

        pvh_floor = []
        for _ in range(rounds):
            time.sleep(IDLE_S)
            idle.append(timed(run, env=env))
            restored.append(timed(run, env=env))
            ours.append(timed(run, env=cold_env))
            floor.append(timed(raw(installed)))
            pvh_floor.append(timed(raw(pvh)))
    # The floor: the kernel as the package installs it, booted raw with a tiny initrd. The
    # PVH floor boots hshelper's own unpacked vmlinux the same way: what is left of our
    # overhead once the kernel's self-decompression is taken out of both.
    return {"run_true_s": statistics.median(ours), "vm_floor_s": statistics.median(floor),
            "vm_floor_pvh_s": statistics.median(pvh_floor),
            "run_true_restored_s": statistics.median(restored),
            "run_true_restored_after_idle_s": statistics.median(idle)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-run", action="store_true", help="build numbers only")
    args = parser.parse_args()
    # Byte-compiled, as installed packages are: with PYTHONDONTWRITEBYTECODE set and a
    # changed tree, every run would compile hshelper first (about 65 ms).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "hshelper"),
                    str(HERE.parent / "plugins")], check=True, stdout=subprocess.DEVNULL)
    root = buildroots.ensure_root("bookworm")
    results = bench_build(root, args.rounds)
    if not args.skip_run:
        results.update(bench_run(root, args.rounds))
    r = results
    print(f"cold build   {r['cold_s']:.2f} s  = {r['cold_s'] / r['cold_floor_s']:.1f}x the "
          f"cpio+zstd floor ({r['cold_floor_s']:.2f} s); target < {TARGETS['cold_s']} s")
    print(f"warm build   {r['warm_s']:.3f} s = {r['warm_s'] / r['import_s']:.1f}x importing "
          f"hshelper ({r['import_s']:.3f} s); target < {TARGETS['warm_s']} s")
    print(f"initrd size  {results['size_mb']:.1f} MB; target < {TARGETS['size_mb']} MB")
    if "run_true_s" in results:
        print(f"helper-run true  {r['run_true_s']:.2f} s = "
              f"{r['run_true_s'] / r['vm_floor_s']:.2f}x the VM floor "
              f"({r['vm_floor_s']:.2f} s: the installed kernel, tiny initrd; target <= 1.0x), "
              f"{r['run_true_s'] / r['vm_floor_pvh_s']:.2f}x the PVH floor "
              f"({r['vm_floor_pvh_s']:.2f} s: the same kernel unpacked, tiny initrd)")
        print(f"helper-run true restored {r['run_true_restored_s']:.2f} s = "
              f"{r['run_true_restored_s'] / r['run_true_s']:.2f}x the cold run, "
              f"{r['run_true_restored_s'] / r['vm_floor_s']:.2f}x the VM floor; "
              f"goal < 0.5 s (back to back; after {IDLE_S:g} s idle: "
              f"{r['run_true_restored_after_idle_s']:.2f} s)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

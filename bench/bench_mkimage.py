"""The standard image job, hshelper's mkimage recipe against baselines run side by side.

    python3 bench/bench_mkimage.py [--rounds N] [--inputs] [--no-guestfish]

The job: a 1 GiB raw image, GPT, a 100 MiB FAT32 ESP, an ext4 root filled from a ~100 MB
tree (the target-bookworm test root without kernel modules, /boot, GRUB and the shared
libraries: about 100 MB in 5300 entries), given as a plain tarball.

  hshelper   ``helper-run --recipe mkimage --size 1G tree.tar out.img`` as uid 65534 in
             the bookworm build root, under TCG: the default, where the partition table
             and the ext4 root are written on the host while the VM boots, and the
             VM writes the fstab. The build root has a tmpfs on /dev/shm for the
             unpacked tree, as mock and sbuild give one (without it the tree goes
             beside the image, on this machine's disk: seconds slower, and noisy)
  floor      the hand-rolled pipeline on the host, no VM: truncate, sfdisk on the file,
             mkfs.vfat --offset and mtools for the ESP, mke2fs -d -E offset for the root
             (from the tree extracted beforehand, not timed; run unprivileged it would
             give the files to the build user: the reason to use a VM at all)
  vm floor   the same kernel booted raw by qemu (TCG) with a tiny busybox initrd that
             powers off at once (bench/bench.py's floor)
  guestfish  libguestfs doing the same job (part-init, mkfs, tar-in), where installed
  --inputs   also the root filled in the VM (--guest-fill: the tarball attached as a
             read-only disk, the fastest way in), and the recipe run by path with ROOT
             as the tarball over 9p and as a directory over 9p
  --reproducible  also the job with SOURCE_DATE_EPOCH set: a reproducible image
  --restore  also the job booted cold (saved VM states off) beside the default, which
             restores a saved state; one more run of each with --report splits its time
             into start (restore or boot), host fill, guest work and the rest
  --against CHECKOUT  also hshelper's job with another checkout of hshelper (a git
             worktree of the base of a change, say), installed into the build root before
             each of its rounds, with a cache of its own: this checkout / that one

Target (issue 5): hshelper <= vm floor + 2 x floor, and >= 5x faster than guestfish.
Rounds alternate the candidates; medians are reported. The machines here are noisy and
shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import buildroots  # noqa: E402
import chroot  # noqa: E402
import imagecheck  # noqa: E402

EXCLUDE = ("./usr/lib/modules", "./boot", "./usr/lib/grub", "./usr/lib/x86_64-linux-gnu",
           "./.hshelper-root-done")
WORK = "/home/builder/bench-mkimage"
OPTIONS = ["--esp-size", "100MiB", "--bootloader", "none"]
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def base_bench():
    """bench/bench.py, for its VM floor (tiny initrd, raw qemu command line)."""
    spec = importlib.util.spec_from_file_location("hshelper_bench", HERE / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(func: Callable[[], None]) -> float:
    start = time.monotonic()
    func()
    return time.monotonic() - start


def make_inputs(root: Path, target: Path) -> Path:
    """tree.tar (and the tree/ it came from) in the build user's bench directory."""
    host = root / WORK.lstrip("/")
    if not (host / "tree.tar").exists():
        host.mkdir(parents=True, exist_ok=True)
        argv = ["tar", "--numeric-owner", "-C", str(target), "-cf", str(host / "tree.tar.tmp")]
        subprocess.run([*argv, *(f"--exclude={e}" for e in EXCLUDE), "."], check=True)
        os.rename(host / "tree.tar.tmp", host / "tree.tar")
        (host / "tree").mkdir()
        subprocess.run(["tar", "--numeric-owner", "-xpf", str(host / "tree.tar"), "-C",
                        str(host / "tree")], check=True)
    # The recipes by path, for the 9p variants (--recipe would attach ROOT as a disk).
    shutil.rmtree(host / "recipes", ignore_errors=True)
    shutil.copytree(chroot.SRC / "recipes", host / "recipes",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    # Readable by the build user over 9p (the 9p-dir variant); owners do not matter here.
    subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(host)],
                   check=True)
    return host


def hshelper_job(root: Path, host: Path, variant: str, out: str = "out.img",
                 env: dict[str, str] | None = None) -> Callable[[], None]:
    by_name = ["--recipe", "mkimage", "--size", "1G", *OPTIONS, "tree.tar", out]
    by_path = ["--disk", f"{out}.part,size=1G,name=out", "recipes/mkimage.sh", *OPTIONS]
    argv = {"host-fill": by_name, "guest-fill": ["--guest-fill", *by_name],
            "9p-tar": [*by_path, "tree.tar", out],
            "9p-dir": [*by_path, "tree", out]}[variant]

    def run() -> None:
        (host / out).unlink(missing_ok=True)
        proc = chroot.run(root, ["helper-run", "-q", *argv], cwd=WORK, timeout=1800, env=env)
        if proc.returncode != 0 or not (host / out).exists():
            raise SystemExit(f"bench: helper-run failed ({variant}): {proc.stderr.decode()}")
    return run


def handrolled_job(tree: Path, out: Path) -> Callable[[], None]:
    """The floor: every step unprivileged on a plain file."""
    def run() -> None:
        out.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", "1G", str(out)], check=True)
        subprocess.run(["sfdisk", "-q", str(out)], check=True, text=True,
                       input=f"label: gpt\nsize=100MiB, type={ESP_TYPE}\ntype=L\n")
        esp, rootp = imagecheck.layout(out).partitions
        subprocess.run(["mkfs.vfat", "-F", "32", "-s", "1", f"--offset={esp.start}", str(out),
                        str(esp.size // 2)], check=True, stdout=subprocess.DEVNULL)
        img = f"{out}@@{esp.start * 512}"
        subprocess.run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT"], check=True)
        subprocess.run(["mcopy", "-i", img, str(tree / "etc/os-release"), "::/EFI/BOOT/"],
                       check=True)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E",
                        f"offset={rootp.start * 512}", "-d", str(tree), str(out),
                        f"{rootp.size // 2}k"], check=True)
    return run


def vm_floor_job(root: Path, work: Path) -> Callable[[], None]:
    bench = base_bench()
    bench.tiny_initrd(root, work / "tiny.cpio")
    kernel = str(next((root / "boot").glob("vmlinuz-*")))
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc,accel=tcg", "-cpu", "max", "-m", "512", "-smp", "1",
            "-no-reboot", "-kernel", kernel, "-initrd", str(work / "tiny.cpio"),
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init", "-serial", "null"]
    return lambda: subprocess.run(argv, check=True)


def guestfish_job(root: Path, tarball: Path, out: Path) -> Callable[[], None] | None:
    if not shutil.which("guestfish"):
        print("bench: guestfish not installed (libguestfs-tools): not timed", file=sys.stderr)
        return None
    if not Path("/lib/modules").is_dir():
        # supermin lstat()s the host's /lib/modules even when SUPERMIN_MODULES points
        # elsewhere; a host without a kernel of its own (a container) has none.
        print("bench: guestfish skipped: supermin needs a /lib/modules directory on the "
              "host (mkdir /lib/modules is enough)", file=sys.stderr)
        return None
    kernel = next((root / "boot").glob("vmlinuz-*"))
    version = kernel.name[len("vmlinuz-"):]
    # No kernel in the host's /boot here: libguestfs's appliance borrows the build
    # root's. KVM is broken on this machine, so TCG, like everything else here.
    env = dict(os.environ, SUPERMIN_KERNEL=str(kernel), SUPERMIN_KERNEL_VERSION=version,
               SUPERMIN_MODULES=str(root / "lib/modules" / version),
               LIBGUESTFS_BACKEND="direct", LIBGUESTFS_BACKEND_SETTINGS="force_tcg",
               LIBGUESTFS_CACHEDIR="/var/tmp/hshelper-bench-guestfs")
    Path(env["LIBGUESTFS_CACHEDIR"]).mkdir(exist_ok=True)
    script = (f"part-init /dev/sda gpt\npart-add /dev/sda p 2048 206847\n"
              f"part-add /dev/sda p 206848 -34\npart-set-gpt-type /dev/sda 1 {ESP_TYPE}\n"
              "mkfs vfat /dev/sda1\nmkfs ext4 /dev/sda2\nmount /dev/sda2 /\n"
              f"tar-in {tarball} /\numount-all\n")

    def run() -> None:
        out.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", "1G", str(out)], check=True)
        subprocess.run(["guestfish", "--rw", "--format=raw", "-a", str(out)],
                       input="run\n" + script, text=True, env=env, check=True)
    return run


def split_times(root: Path, host: Path) -> dict[str, dict[str, float]]:
    """One more run restored and one booted cold, with --report and -v: where the time
    goes (the start: restore or boot to the command; the host's fill; the guest's own
    work after its start; and the rest: hshelper's start-up and the VM's end)."""
    out = {}
    for how, env in (("restored", None), ("cold", {"HSHELPER_RUN_SAVED_STATES": "0"})):
        (host / "split.img").unlink(missing_ok=True)
        argv = ["helper-run", "-q", "-v", "--report", "split.json", "--recipe", "mkimage",
                "--size", "1G", *OPTIONS, "tree.tar", "split.img"]
        proc = chroot.run(root, argv, cwd=WORK, timeout=1800, env=env)
        if proc.returncode:
            raise SystemExit(f"bench: helper-run failed ({how}): {proc.stderr.decode()}")
        report = json.loads((host / "split.json").read_text())["timings"]
        fill = re.search(rb"root filled on the host in ([0-9.]+) s", proc.stderr)
        start = report["boot_seconds"]
        out[how] = {"start": start, "host fill (beside the start)":
                    float(fill.group(1)) if fill else 0.0,
                    "guest work": report["vm_seconds"] - start,
                    "the rest": report["total_seconds"] - report["vm_seconds"]}
    return out


def check_image(image: Path, tmp: Path) -> None:
    """Every candidate's image must really hold the job: both filesystems clean."""
    esp, rootp = imagecheck.layout(image).partitions
    for part, kind, name in ((esp, "vfat", "esp.img"), (rootp, "ext4", "root.img")):
        proc = imagecheck.fsck(imagecheck.extract(image, part, tmp / name), kind)
        if proc.returncode != 0:
            raise SystemExit(f"bench: {image}: {kind} partition not clean:\n{proc.stdout}")
    (tmp / "esp.img").unlink()
    (tmp / "root.img").unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--inputs", action="store_true",
                        help="also time ROOT over 9p (tarball, directory)")
    parser.add_argument("--no-guestfish", action="store_true")
    parser.add_argument("--reproducible", action="store_true",
                        help="also time the job with SOURCE_DATE_EPOCH set")
    parser.add_argument("--restore", action="store_true",
                        help="also time the job booted cold, and split both runs' time")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also time hshelper's job with this other checkout")
    args = parser.parse_args()
    root = buildroots.ensure_root("bookworm")
    chroot.install(root)
    host = make_inputs(root, buildroots.ensure_root("target-bookworm"))
    jobs: dict[str, Callable[[], None]] = {}
    # Run before a job's rounds, untimed: which checkout is installed.
    before: dict[str, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory(prefix="hshelper-bench-") as tmp_name, \
            chroot.proc_mounted(root), chroot.shm_mounted(root):
        tmp = Path(tmp_name)
        jobs["hshelper"] = hshelper_job(root, host, "host-fill")
        if args.against:
            # Its own helper image cache: the cache is keyed by hshelper's code too.
            jobs["hshelper against"] = hshelper_job(
                root, host, "host-fill", "out-against.img",
                {"XDG_CACHE_HOME": f"{chroot.HOME}/.cache-against"})
            before["hshelper against"] = lambda: chroot.install(root, args.against)
        if args.restore:
            jobs["hshelper cold"] = hshelper_job(root, host, "host-fill", "out-cold.img",
                                                 {"HSHELPER_RUN_SAVED_STATES": "0"})
        if args.reproducible:
            jobs["hshelper reproducible"] = hshelper_job(
                root, host, "host-fill", "out-repro.img", {"SOURCE_DATE_EPOCH": "1700000000"})
        if args.inputs:
            for variant in ("guest-fill", "9p-tar", "9p-dir"):
                jobs[f"hshelper {variant}"] = hshelper_job(root, host, variant)
        jobs["floor"] = handrolled_job(host / "tree", tmp / "floor.img")
        jobs["vm floor"] = vm_floor_job(root, tmp)
        gf = None if args.no_guestfish else guestfish_job(root, host / "tree.tar",
                                                            tmp / "gf.img")
        if gf:
            jobs["guestfish"] = gf
        if args.against:
            for name in jobs:
                if name.startswith("hshelper") and name != "hshelper against":
                    before[name] = lambda: chroot.install(root)
        for name in [n for n in jobs if n.startswith("hshelper")]:
            before.get(name, lambda: None)()
            jobs[name]()  # warm the helper image caches: a cold build is bench.py's
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.rounds):
            for name, job in jobs.items():
                before.get(name, lambda: None)()
                times[name].append(timed(job))
                print(f"  {name:22} {times[name][-1]:7.2f} s", file=sys.stderr, flush=True)
        splits = split_times(root, host) if args.restore else {}
        chroot.install(root)
        for image in (host / "out.img", host / "out-against.img", host / "out-repro.img",
                      host / "out-cold.img", tmp / "floor.img", tmp / "gf.img"):
            if image.exists():
                check_image(image, tmp)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nthe job: 1 GiB GPT image, 100 MiB FAT32 ESP, ext4 root from "
          f"{(host / 'tree.tar').stat().st_size / 1e6:.0f} MB tarball; medians of "
          f"{args.rounds} rounds (TCG)")
    for name, value in med.items():
        print(f"  {name:22} {value:7.2f} s")
    budget = med["vm floor"] + 2 * med["floor"]
    print(f"hshelper = {med['hshelper'] / med['floor']:.1f}x the floor; "
          f"{med['hshelper'] - med['vm floor']:.2f} s above the VM floor; "
          f"target <= vm floor + 2 x floor = {budget:.2f} s: "
          f"{'met' if med['hshelper'] <= budget else 'NOT met'}")
    if "guestfish" in med:
        speedup = med["guestfish"] / med["hshelper"]
        print(f"guestfish / hshelper = {speedup:.1f}x (target >= 5x: "
              f"{'met' if speedup >= 5 else 'NOT met'})")
    for name in ("hshelper 9p-tar", "hshelper 9p-dir"):
        if name in med:
            print(f"{name} / hshelper guest-fill (tarball as a disk) = "
                  f"{med[name] / med['hshelper guest-fill']:.2f}x")
    if "hshelper guest-fill" in med:
        print(f"hshelper guest-fill / hshelper (host fill) = "
              f"{med['hshelper guest-fill'] / med['hshelper']:.2f}x")
    if "hshelper against" in med:
        ratios = [a / b for a, b in zip(times["hshelper"], times["hshelper against"])]
        print(f"hshelper (this checkout) / hshelper ({args.against}) = "
              f"{med['hshelper'] / med['hshelper against']:.2f}x (per round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
    if "hshelper cold" in med:
        print(f"hshelper (restored) / hshelper cold = "
              f"{med['hshelper'] / med['hshelper cold']:.2f}x")
        for how, parts in splits.items():
            print(f"  {how:9} " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    if "hshelper reproducible" in med:
        print(f"hshelper reproducible / hshelper = "
              f"{med['hshelper reproducible'] / med['hshelper']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

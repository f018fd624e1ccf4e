"""``helper-run --recipe mkimage|mkimage-mbr|mkimage-loop``: checked up front, disks
attached, the root filled natively, nothing left behind.

What the shell recipes cannot do from inside the VM:

- refuse bad input before any work: closed choices (``--fs``, ``--table``,
  ``--bootloader``), identifiers, sizes, a root partition the ESP leaves too little of,
  a root tree that cannot fit its partition: exit 2, one line, nothing created;
- attach the disk it builds on: with ``--size SIZE`` and no disk named ``out``, this
  attaches ``OUTPUT.part`` of that size; a plain tarball ROOT is attached read-only
  too (the guest's fastest way in) when the root is filled in the guest;
- fill the ext4 root quickly: under TCG the per-file work of unpacking a root tree is
  the slowest part of the job by far, so the partition table (sfdisk), the ESP's FAT
  and the populated ext4 root (mke2fs -d, owners by debugfs: :mod:`hshelper.ext4fill`)
  are written on the host, unprivileged, with the build root's own tools, while the VM
  boots, and the recipe runs with ``--prefilled``: fstab and bootloader in the VM. A
  fill that fails stops the VM at once, and its error is the run's (exit 1);
- clean up after a VM that was stopped (SIGINT, SIGTERM, timeout, a failed fill): the
  recipe's ``.part`` files (OUTPUT, its checksum, the qcow2 copy) are removed when the
  run did not succeed, for recipe runs by name or by path;
- reproducible images (:mod:`hshelper.reproducible`): with ``SOURCE_DATE_EPOCH``, the
  recipe's ``--seed`` or ``[mkimage] seed``, the identifiers the host writes are derived
  from the seed and ROOT's sha256 (given to the recipe as ``--root-sha256``, which the
  guest need not compute), and the run's report records them.

The host fill is used when the root is ext4, ROOT is a directory or a tarball on the
host, OUTPUT is given and no ``--device``; anything else, or a tarball holding what
the host cannot write exactly (POSIX ACLs, hard links to device nodes, names with
newlines), goes the guest's way, with a line saying why. Config: ``[mkimage]
host_fill`` (default true; ``--guest-fill`` turns it off for one run) and ``[mkimage]
seed`` (default none).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hshelper.plugins.disks import parse_size

from hshelper import ext4fill, recipes, reproducible
from hshelper.config import Key
from hshelper.errors import HshelperError
from hshelper.guestrun import quote
from hshelper.hookspecs import hookimpl
from hshelper.model import Disk
from hshelper.qemu import machines
from hshelper.reproducible import Identifiers

# The recipes this plugin knows, with their table; the first two it fills on the host.
RECIPES = {"mkimage": "gpt", "mkimage-mbr": "mbr", "mkimage-loop": "gpt"}
HOST_FILLED = ("mkimage", "mkimage-mbr")
VALUE_OPTIONS = frozenset({"--device", "--table", "--esp-size", "--fs", "--label",
                           "--bootloader", "--kernel", "--append", "--console", "--qcow2",
                           "--size", "--root-uuid", "--root-partuuid", "--esp-id",
                           "--seed", "--root-sha256", "--arch"})
FLAG_OPTIONS = frozenset({"--sha256", "--prefilled"})
FILESYSTEMS = ("ext4", "xfs", "btrfs")
BOOTLOADERS = ("auto", "systemd-boot", "grub", "extlinux", "none")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Linux root (x86-64), as the recipe
SRC_DISK = "/dev/disk/hshelper/src"
MIN_ROOT = 8 << 20  # the smallest root partition the recipe accepts
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                  r"[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class Job:
    """What a mkimage command line asks for, as far as the host needs to know."""

    root: str
    output: str
    options: dict[str, str]  # the value options given (last one wins, as in the recipe)
    flags: frozenset[str]
    root_index: int  # where ROOT is in the recipe's argv

    def get(self, name: str, default: str = "") -> str:
        return self.options.get(name, default)

    @property
    def table(self) -> str:
        return self.get("--table", "gpt")

    @property
    def fs(self) -> str:
        return self.get("--fs", "ext4")

    def machine(self) -> machines.Machine:
        """The image's architecture (--arch, which hshelper_run_spec gives the recipe
        from the VM's machine when the user did not); an unknown one is a usage error."""
        try:
            return machines.lookup(self.get("--arch", "x86_64"))
        except HshelperError as err:
            raise HshelperError(f"mkimage: {err}", status=2) from None

    @property
    def root_type(self) -> str:
        """The root partition's GPT type for the image's architecture."""
        return self.machine().gpt_root_type.upper()

    @property
    def extlinux(self) -> bool:
        bootloader = self.get("--bootloader", "auto")
        return bootloader == "extlinux" or (bootloader == "auto" and self.table == "mbr")

    def part_files(self, cwd: Path) -> tuple[Path, ...]:
        """The temporary names the recipe writes under, in the working directory."""
        names = [f"{self.output}.part", f"{self.output}.sha256.part"]
        if "--qcow2" in self.options:
            names += [f"{self.get('--qcow2')}.part", f"{self.get('--qcow2')}.sha256.part"]
        return tuple(cwd / name for name in names)


def parse_job(recipe: str, argv: list[str]) -> Job | None:
    """The job of ``argv`` (the recipe's arguments), or None when it is not one this
    plugin should touch: --help, an option it does not know (the recipe reports it),
    or no OUTPUT."""
    options: dict[str, str] = {"--table": RECIPES[recipe]}
    flags: set[str] = set()
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if word in VALUE_OPTIONS and i + 1 < len(argv):
            options[word] = argv[i + 1]
            i += 2
        elif word in FLAG_OPTIONS:
            flags.add(word)
            i += 1
        else:
            return None
    rest = argv[i:]
    if len(rest) != 2:
        return None
    return Job(rest[0], rest[1], options, frozenset(flags), i)


def esp_bytes(text: str) -> int | None:
    """Bytes of an ``--esp-size`` in sfdisk's units (a bare number counts sectors; K,
    M, G, T and KiB... are powers of 1024, KB, MB... of 1000), as mkimage.sh reads it."""
    match = re.fullmatch(r"(\d+)(K|k|KiB|M|m|MiB|G|g|GiB|T|t|TiB|KB|MB|GB|TB)?", text)
    if not match:
        return None
    unit = match.group(2) or ""
    power = {"K": 1, "M": 2, "G": 3, "T": 4}.get(unit[:1].upper(), 0)
    base = 1000 if unit.endswith("B") and not unit.endswith("iB") else 1024
    return int(match.group(1)) * (base ** power if unit else 512)


def check_job(job: Job) -> None:
    """Refuse what the recipe would refuse, before any work (exit 2, one line)."""
    def bad(message: str) -> HshelperError:
        return HshelperError(f"mkimage: {message}", status=2)

    if job.table not in ("gpt", "mbr"):
        raise bad(f"--table must be gpt or mbr, not {job.table!r}")
    if job.fs not in FILESYSTEMS:
        raise bad(f"--fs must be ext4, xfs or btrfs, not {job.fs!r}")
    bootloader = job.get("--bootloader", "auto")
    if bootloader not in BOOTLOADERS:
        raise bad(f"--bootloader must be auto, systemd-boot, grub, extlinux or none, "
                  f"not {bootloader!r}")
    if bootloader in ("systemd-boot", "grub") and job.table != "gpt":
        raise bad(f"--bootloader {bootloader} needs --table gpt")
    if not esp_bytes(job.get("--esp-size", "256MiB")):
        raise bad(f"--esp-size: a size like 256MiB, 100M or 1G, not "
                  f"{job.get('--esp-size')!r}")
    if "--size" in job.options:
        parse_size(job.get("--size"))  # its own usage error
    if job.get("--root-uuid") and not UUID.fullmatch(job.get("--root-uuid")):
        raise bad(f"--root-uuid: not a UUID: {job.get('--root-uuid')}")
    partuuid = job.get("--root-partuuid")
    if partuuid and not (UUID.fullmatch(partuuid) if job.table == "gpt"
                         else re.fullmatch(r"[0-9a-fA-F]{8}-01", partuuid)):
        raise bad(f"--root-partuuid: not a UUID: {partuuid}" if job.table == "gpt" else
                  f"--root-partuuid with --table mbr: DISKID-01 (8 hex digits), not "
                  f"{partuuid}")
    if job.get("--esp-id") and not re.fullmatch(r"[0-9a-fA-F]{8}", job.get("--esp-id")):
        raise bad(f"--esp-id: 8 hex digits, not {job.get('--esp-id')}")
    if job.get("--root-sha256") and not re.fullmatch(r"[0-9a-fA-F]{64}",
                                                      job.get("--root-sha256")):
        raise bad(f"--root-sha256: 64 hex digits, not {job.get('--root-sha256')}")


def root_partition_bytes(job: Job, disk: int) -> int:
    """About what the root partition gets of a ``disk``-byte disk: what the ESP leaves,
    less 1 MiB of alignment at the start and the backup GPT at the end (as the recipe
    reckons)."""
    if job.table == "gpt":
        return disk - (esp_bytes(job.get("--esp-size", "256MiB")) or 0) - (2 << 20)
    return disk - (1 << 20)


def check_room(job: Job, disk: int) -> None:
    room = root_partition_bytes(job, disk)
    if room < MIN_ROOT:
        after = f" after the {job.get('--esp-size', '256MiB')} ESP" if job.table == "gpt" \
            else ""
        raise HshelperError(f"mkimage: the {disk}-byte disk leaves no room for the root "
                            f"(at least 8 MiB){after}: a larger --size, or a smaller "
                            "--esp-size", status=2)


def random_identifiers(table: str) -> Identifiers:
    import uuid  # here: with platform, 2 ms of every run's start

    if table == "gpt":
        disk, partuuid = str(uuid.uuid4()), str(uuid.uuid4())
    else:
        disk = uuid.uuid4().hex[:8]
        partuuid = f"{disk}-01"
    return Identifiers(disk, str(uuid.uuid4()), partuuid, str(uuid.uuid4()),
                       uuid.uuid4().hex[:8].upper(), "")


def identifiers(job: Job, repro: reproducible.Settings | None = None,
                root_sha256: str = "") -> Identifiers:
    """Every identifier of the image: the ones the command line gives, else derived
    (a reproducible image) or new ones."""
    base = (reproducible.identifiers(repro.seed, root_sha256, job.table) if repro
            else random_identifiers(job.table))
    partuuid = job.get("--root-partuuid") or base.root_partuuid
    return dataclasses.replace(
        base, root_uuid=job.get("--root-uuid") or base.root_uuid,
        root_partuuid=partuuid, esp_id=(job.get("--esp-id") or base.esp_id).upper(),
        disk=partuuid[:8] if job.table == "mbr" else base.disk)


def sfdisk_script(table: str, esp_size: str, ids: Identifiers,
                  root_type: str = ROOT_TYPE) -> str:
    """The recipe's partition table as sfdisk input (the same as mkimage.sh writes)."""
    if table == "gpt":
        return (f"label: gpt\nlabel-id: {ids.disk}\n"
                f'size={esp_size}, type={ESP_TYPE}, uuid={ids.esp_part}, name="esp"\n'
                f'type={root_type}, uuid={ids.root_partuuid}, name="root"\n')
    return f"label: dos\nlabel-id: 0x{ids.root_partuuid[:8]}\ntype=83, bootable\n"


def fat32_cluster_sectors(size: int) -> int:
    """Sectors per cluster as mkfs.fat picks them for a FAT32 device of ``size`` bytes.

    Given a file, an offset and a block count it picks differently (8 for 256 MiB: too
    few clusters for FAT32, which mtools and some firmware refuse), so the host says
    what the guest's mkfs.vfat on the partition would have chosen.
    """
    for limit, sectors in ((260 << 20, 1), (8 << 30, 8), (16 << 30, 16), (32 << 30, 32)):
        if size <= limit:
            return sectors
    return 64


def partitions(sfdisk_json: str) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition in ``sfdisk -J`` output."""
    data = json.loads(sfdisk_json)["partitiontable"]
    sector = data.get("sectorsize", 512)
    return [(p["start"] * sector, p["size"] * sector) for p in data.get("partitions", [])]


def _partition(image: Path, job: Job, ids: Identifiers,
               epoch: int | None) -> tuple[int, int]:
    """Write the table (and the ESP's FAT: block-level, cheap natively, 0.6 s under
    TCG); the root partition's (offset, size)."""
    needed = ("sfdisk", "mke2fs", "debugfs") + (("mkfs.vfat",) if job.table == "gpt" else ())
    tools = {tool: ext4fill.find_tool(tool) for tool in needed}
    missing = [tool for tool, path in tools.items() if path is None]
    if missing:
        raise ext4fill.Unsupported(f"no {' or '.join(missing)} in the build root")
    sfdisk = str(tools["sfdisk"])
    proc = subprocess.run([sfdisk, "-q", "--wipe", "always", str(image)], text=True,
                          input=sfdisk_script(job.table, job.get("--esp-size", "256MiB"),
                                              ids, job.root_type),
                          capture_output=True)
    if proc.returncode != 0:
        raise HshelperError(f"mkimage: partitioning {image} failed: {proc.stderr.strip()}",
                            status=1)
    parts = partitions(subprocess.run([sfdisk, "-J", str(image)], capture_output=True,
                                      text=True).stdout or '{"partitiontable": {}}')
    if len(parts) != (2 if job.table == "gpt" else 1):
        raise HshelperError(f"mkimage: sfdisk made no {job.table} table in {image}", status=1)
    if job.table == "mbr":
        return parts[0]
    (esp_offset, esp_size), root = parts
    # --invariant: nothing from the clock or the random pool (a reproducible image).
    # First: it sets a volume id of its own, which -i then replaces.
    proc = subprocess.run([str(tools["mkfs.vfat"]),
                           *(["--invariant"] if epoch is not None else []),
                           "-F", "32", "-n", "ESP", "-i", ids.esp_id,
                           "-s", str(fat32_cluster_sectors(esp_size)),
                           f"--offset={esp_offset // 512}", str(image),
                           str(esp_size // 1024)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HshelperError(f"mkimage: making the ESP in {image} failed: "
                            f"{proc.stderr.strip()}", status=1)
    if epoch is not None:
        # The volume label's directory entry, dated like the rest of the image.
        with open(image, "r+b") as fh:
            fh.seek(esp_offset)
            where, stamp = reproducible.fat_label_stamp(fh.read(512), epoch)
            fh.seek(esp_offset + where)
            fh.write(stamp)
    return root


@dataclass
class Fill:
    """A host fill: checked and partitioned before the VM starts, the filesystem then
    written while the guest boots (the boot takes seconds under TCG, the fill about as
    long, and the machine has a second core). The guest waits for ``marker.ok``
    before it touches the disks; a failure writes ``marker.err`` and stops the VM
    (``watch``): its error is the run's."""

    source: Path
    kind: str  # ext4fill.source_kind's answer
    fs: ext4fill.Ext4
    marker: Path | None  # None: fill before the VM starts
    thread: threading.Thread | None = None
    done: str = ""
    error: BaseException | None = None
    started: float = 0.0
    seconds: float = 0.0
    stop: object | None = None  # the run's stop request (see _stop_vm)

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            self.done = ext4fill.fill(self.source, self.fs, self.fs.image.parent, self.kind)
        except BaseException as err:  # noqa: BLE001 - reported through the marker
            self.error = err
        self.seconds = time.monotonic() - self.started
        if self.error:
            self._stop_vm()
        if self.marker:
            self.flag("err" if self.error else "ok").touch()

    def watch(self, stop) -> None:
        """Stop the VM through ``stop`` (the run's) as soon as the fill has failed."""
        self.stop = stop
        if self.error:
            self._stop_vm()

    def _stop_vm(self) -> None:
        # The guest would only wait for a root that will not come: end the run now.
        # The stop is a threading.Event carrying the status, or (the VM side after its
        # move into hshelper/qemu) a StopRequest with request(status).
        if self.stop is None:
            return
        if hasattr(self.stop, "request"):
            self.stop.request(1)
        else:
            self.stop.status = 1
            self.stop.set()

    @property
    def message(self) -> str:
        return f"mkimage: filling the root on the host failed: {self.error}"

    def flag(self, state: str) -> Path:
        return Path(f"{self.marker}.{state}")

    def start(self) -> None:
        # Not a daemon: should the run end early, the process still waits for the fill
        # (a killed fill would leave its unpacked tree behind), then atexit cleans up.
        self.thread = threading.Thread(target=self.run, name="mkimage-fill")
        self.thread.start()
        atexit.register(self.finish)

    def finish(self) -> None:
        """Wait for the fill and remove the markers (the VM has stopped)."""
        if self.thread:
            self.thread.join()
        if self.marker:
            for state in ("ok", "err"):
                self.flag(state).unlink(missing_ok=True)


# The fill of the current run, and the files to remove unless it succeeds (one run a
# process).
_fills: list[Fill] = []
_parts: list[Path] = []


def prepare(job: Job, image: Path, source: Path, kind: str, ids: Identifiers,
            marker: Path | None, epoch: int | None = None) -> Fill:
    """Partition ``image``; the :class:`Fill` that writes the root from ``source``
    (checked already: :func:`ext4fill.scan`)."""
    offset, size = _partition(image, job, ids, epoch)
    fs = ext4fill.Ext4(image, offset, size, job.get("--label", "root"), ids.root_uuid,
                       ("^64bit",) if job.extlinux else (), ids.hash_seed, epoch)
    return Fill(source, kind, fs, marker)


def wait_code(marker: Path) -> str:
    """Guest setup code: wait for the host's fill (over the shared directory). A failed
    fill stops the VM from the host, with the fill's error: the guest only gives up
    on its own (and says so) should that not happen."""
    # The share is where the command sees it: under $hsh_newroot, from the init.
    ok = '"$hsh_newroot"' + quote(f"{marker}.ok")
    err = '"$hsh_newroot"' + quote(f"{marker}.err")
    return (f"while [ ! -e {ok} ]; do\n"
            f"  if [ -e {err} ]; then sleep 10; return 1; fi\n"
            "  sleep 0.05\n"
            "done\n")


@hookimpl
def hshelper_config_keys():
    return [Key("mkimage", "host_fill", bool, True,
                "--recipe mkimage: write the partition table and the ext4 root on the "
                "host (fast), not in the VM"),
            Key("mkimage", "seed", str, "",
                "--recipe mkimage*: make reproducible images, with identifiers derived "
                "from this seed (as the recipes' --seed)")]


@hookimpl
def hshelper_add_arguments(parser, command):
    if command == "run":
        parser.add_argument("--guest-fill", action="store_true",
                            help="with --recipe mkimage: fill the root in the VM, not on the host")


def _out_disk(spec, job: Job, cwd: Path) -> tuple[Disk | None, int | None]:
    """The disk named ``out``, or the OUTPUT.part that --size asks to attach (not made
    yet); and the disk's size in bytes."""
    for disk in spec.disks:
        if disk.name == "out":
            size = disk.path.stat().st_size if disk.path.exists() else disk.size
            return disk, size
    if "--size" not in job.options:
        return None, None
    size = parse_size(job.get("--size"))
    return Disk((cwd / f"{job.output}.part").absolute(), "out", "raw", size), size


def _recipe_of(spec) -> str | None:
    """The shipped recipe a run runs: by name (--recipe), or by path (a copy of it:
    the same name and the same header line, not any script called mkimage.sh)."""
    name = spec.extra.get("recipe")
    if name is None and spec.argv:
        base = os.path.basename(spec.argv[0])
        name = base[:-3] if base.endswith(".sh") else None
        if name not in RECIPES or _header(Path(spec.cwd, spec.argv[0])) != _header(
                recipes.directory() / base):
            return None
    return name if name in RECIPES else None


def _header(path: Path) -> str | None:
    """The second line of a script (a recipe's summary comment)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            fh.readline()
            return fh.readline()
    except OSError:
        return None


def _insert(argv: list[str], job: Job, words: list[str]) -> list[str]:
    """``words`` (options) placed before ROOT, after every option of the command."""
    return [*argv[:job.root_index], *words, *argv[job.root_index:]]


@hookimpl
def hshelper_run_spec(spec, config, args, machine):
    recipe = _recipe_of(spec)
    if recipe is None:
        return None
    argv = list(spec.argv[1:])
    job = parse_job(recipe, argv)
    if job is None:
        return None
    cwd = Path(spec.cwd)
    _parts[:] = job.part_files(cwd)
    if "recipe" not in spec.extra:
        return None  # by path: the command is the user's; only the cleanup is ours
    check_job(job)
    env = dict(spec.env)
    given_seed = job.get("--seed") if "--seed" in job.options else None
    try:
        repro = reproducible.settings(
            given_seed if given_seed is not None else (config.get("mkimage", "seed") or None),
            env, "--seed" if given_seed is not None else "config")
    except reproducible.BadSetting as err:
        raise HshelperError(f"mkimage: {err}", status=2) from None
    if repro and job.fs != "ext4":
        raise HshelperError(f"mkimage: reproducible images (--seed, SOURCE_DATE_EPOCH) need "
                            f"--fs ext4, not {job.fs}", status=2)
    extra = dict(spec.extra)
    words: list[str] = []
    if "--arch" not in job.options:
        # The image is for the build root's architecture, and the host writes its
        # partition table: both must know it.
        job = dataclasses.replace(job, options={**job.options, "--arch": machine.arch})
        words += ["--arch", machine.arch]
    job.machine()  # an unknown --arch is a usage error now, not after the boot
    if repro:
        extra.update(repro_seed=repro.seed, repro_epoch=str(repro.epoch),
                     repro_seed_from=repro.seed_from)
        if repro.seed_from == "config":
            words += ["--seed", repro.seed]
    out, disk_bytes = _out_disk(spec, job, cwd)
    if (recipe not in HOST_FILLED or "--device" in job.options or "--prefilled" in job.flags
            or out is None or out.path != (cwd / f"{job.output}.part").absolute()):
        # The recipe attaches or finds its disk itself; a reproducible one still gets
        # ROOT's digest from here, where hashing is fast.
        spec = dataclasses.replace(spec, extra=extra)
        if repro and "--prefilled" not in job.flags:
            spec, words = _guest_repro(spec, job, argv, words, None)
        return dataclasses.replace(spec, argv=(spec.argv[0], *_insert(argv, job, words)))
    try:
        return _attach_and_fill(spec, config, args, job, out, disk_bytes, repro, argv,
                                words, extra)
    except BaseException:
        out.path.unlink(missing_ok=True)  # as the recipe does: no half-made image
        raise


def _attach_and_fill(spec, config, args, job: Job, out: Disk, disk_bytes: int | None,
                     repro, argv: list[str], words: list[str], extra: dict):
    cwd = Path(spec.cwd)
    if disk_bytes is not None:
        check_room(job, disk_bytes)
    # ROOT under /dev/ is a disk in the guest (--disk ...,name=src): nothing to read here.
    source = cwd / job.root
    kind = None if job.root.startswith("/dev/") else ext4fill.source_kind(source)
    want = (config.get("mkimage", "host_fill") and not getattr(args, "guest_fill", False)
            and job.fs == "ext4" and out.format == "raw" and kind is not None)
    usage = None
    if want:
        try:
            usage = ext4fill.dir_usage(source) if kind == "dir" else ext4fill.scan(source,
                                                                                    kind)
        except ext4fill.Unsupported as why:
            print(f"hshelper: mkimage: filling the root in the VM: {why}", file=sys.stderr)
            want = False
    if usage is None and kind in ("dir", "tar"):
        # Cheap to read: the check below holds for the guest's fill too.
        usage = ext4fill.dir_usage(source) if kind == "dir" else ext4fill.scan(
            source, kind, check=False)
    if usage is not None and disk_bytes is not None:
        problem = ext4fill.room_problem(usage, root_partition_bytes(job, disk_bytes))
        if problem:
            raise HshelperError(f"mkimage: {problem}: a larger --size", status=2)
    made = not any(d.name == "out" for d in spec.disks)
    if made:
        # OUTPUT.part is the recipe's own temporary name: a leftover of a killed run is
        # started over.
        with open(out.path, "wb") as fh:
            fh.truncate(out.size)
    disks = (*spec.disks, out) if made else spec.disks
    if want:
        # The guest can wait for a fill running alongside its boot when it sees the
        # working directory (the markers are there).
        overlap = not getattr(args, "no_share_cwd", False) and spec.cwd != "/"
        marker = cwd / f".hshelper-fill-{os.urandom(6).hex()}" if overlap else None
        digest = job.get("--root-sha256").lower()
        if repro and not digest and kind != "dir":
            digest = reproducible.file_sha256(source)
        ids = identifiers(job, repro, digest)
        try:
            fill = prepare(job, out.path, source, kind, ids, marker,
                           repro.epoch if repro else None)
        except ext4fill.Unsupported as why:
            print(f"hshelper: mkimage: filling the root in the VM: {why}", file=sys.stderr)
        else:
            _fills.append(fill)
            if marker:
                fill.start()
                extra["mkimage_marker"] = str(marker)
            else:
                fill.run()
                if fill.error:
                    raise fill.error
                _report(fill, spec.verbose)
            given = ["--prefilled", "--root-uuid", ids.root_uuid,
                     "--root-partuuid", ids.root_partuuid]
            given += ["--esp-id", ids.esp_id] if job.table == "gpt" else []
            if repro:
                extra["repro_root_sha256"] = digest
            return dataclasses.replace(spec, argv=(spec.argv[0], *given,
                                                   *_insert(argv, job, words)),
                                       disks=disks, extra=extra)
    spec = dataclasses.replace(spec, disks=disks, extra=extra)
    if repro:
        spec, words = _guest_repro(spec, job, argv, words, usage)
    if not any(d.name == "src" for d in disks) and kind == "tar":
        # A plain tarball is read fastest as a disk (the share costs 10 % more).
        spec = dataclasses.replace(spec, disks=(*spec.disks, Disk(source.absolute(), "src",
                                                                  "raw", None, True)))
        argv = [*argv[:job.root_index], SRC_DISK, *argv[job.root_index + 1:]]
    return dataclasses.replace(spec, argv=(spec.argv[0], *_insert(argv, job, words)))


def _root_file(spec, job: Job) -> Path | None:
    """The host file behind ROOT: a file in the working directory, or the file of the
    disk ROOT names (/dev/disk/hshelper/NAME)."""
    if job.root.startswith("/dev/disk/hshelper/"):
        name = job.root.rsplit("/", 1)[1]
        return next((d.path for d in spec.disks if d.name == name and d.format == "raw"),
                    None)
    if job.root.startswith("/dev/"):
        return None
    path = Path(spec.cwd) / job.root
    return path if path.is_file() else None


def _guest_repro(spec, job: Job, argv: list[str], words: list[str],
                 usage: ext4fill.Usage | None):
    """A reproducible image the guest fills: ROOT's sha256 from here (hashing takes
    seconds under TCG), and the memory its tarball is unpacked into there."""
    source = _root_file(spec, job)
    if source is None or not source.is_file():
        return spec, words
    digest = job.get("--root-sha256").lower() or reproducible.file_sha256(source)
    if "--root-sha256" not in job.options:
        words = [*words, "--root-sha256", digest]
    need = sum(usage.sizes) if usage else source.stat().st_size * (
        1 if ext4fill.source_kind(source) == "tar" else 4)
    return dataclasses.replace(
        spec, memory_mb=max(spec.memory_mb, need // (1 << 20) + 384),
        extra={**spec.extra, "repro_root_sha256": digest}), words


def _report(fill: Fill, verbose: bool) -> None:
    if verbose:
        print(f"hshelper: mkimage: root filled on the host in {fill.seconds:.2f} s: "
              f"{fill.done}", file=sys.stderr)


@hookimpl
def hshelper_guest_setup(spec):
    marker = spec.extra.get("mkimage_marker")
    return [("mkimage-fill", wait_code(Path(marker)))] if marker else []


@hookimpl(hookwrapper=True)
def hshelper_run_vm(spec, stop):
    for fill in _fills:
        fill.watch(stop)
    outcome = yield
    failed = None
    while _fills:
        fill = _fills.pop()
        fill.finish()
        if fill.error:
            failed = fill
        elif fill.marker:
            _report(fill, spec.verbose)
    try:
        result = outcome.get_result()
    except BaseException:  # noqa: BLE001 - qemu did not run; the error goes on as it is
        result = None
    if failed is not None and result is not None:
        # The guest only waited: the fill's error is the run's.
        result = dataclasses.replace(result, status=1, reason=failed.message)
        outcome.force_result(result)
    if result is None or result.status != 0:
        # A stopped VM leaves the recipe's temporary files behind (its own cleanup
        # never ran): nothing that looks like an image may stay.
        for path in _parts:
            path.unlink(missing_ok=True)
    _parts.clear()

"""``helper-run --recipe mkimage|mkimage-mbr``: disks attached, the root filled natively.

Two things the shell recipe cannot do from inside the VM:

- attach the disk it builds on: with ``--size SIZE`` and no disk named ``out``, this
  attaches ``OUTPUT.part`` of that size; a plain tarball ROOT is attached read-only
  too (the guest's fastest way in) when the root is filled in the guest;
- fill the ext4 root quickly: under TCG the per-file work of unpacking a root tree is
  the slowest part of the job by far, so the partition table (sfdisk) and the
  populated ext4 root (mke2fs -d, owners by debugfs: :mod:`hshelper.ext4fill`) are
  written on the host, unprivileged, with the build root's own tools, and the recipe
  runs with ``--prefilled``: ESP, fstab and bootloader in the VM.

The host fill is used when the root is ext4, ROOT is a directory or a tarball on the
host, OUTPUT is given and no ``--device``; anything else, or a tarball holding what
the host cannot write exactly (POSIX ACLs, hard links to device nodes, names with
newlines), goes the guest's way, with a line saying why. Config: ``[mkimage]
host_fill`` (default true); ``--guest-fill`` turns it off for one run.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hshelper.plugins.disks import parse_size

from hshelper import ext4fill
from hshelper.config import Key
from hshelper.errors import HshelperError
from hshelper.guestrun import quote
from hshelper.hookspecs import hookimpl
from hshelper.model import Disk

RECIPES = {"mkimage": "gpt", "mkimage-mbr": "mbr"}
VALUE_OPTIONS = frozenset({"--device", "--table", "--esp-size", "--fs", "--label",
                           "--bootloader", "--kernel", "--append", "--console", "--qcow2",
                           "--size", "--root-uuid", "--root-partuuid", "--esp-id"})
FLAG_OPTIONS = frozenset({"--sha256", "--prefilled"})
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Linux root (x86-64), as the recipe
SRC_DISK = "/dev/disk/hshelper/src"


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
    def extlinux(self) -> bool:
        bootloader = self.get("--bootloader", "auto")
        return bootloader == "extlinux" or (bootloader == "auto" and self.table == "mbr")


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


def identifiers(job: Job) -> tuple[str, str, str]:
    """(root UUID, root PARTUUID, ESP volume id): the ones the command line gives, else
    new ones."""
    partuuid = str(uuid.uuid4()) if job.table == "gpt" else f"{uuid.uuid4().hex[:8]}-01"
    return (job.get("--root-uuid") or str(uuid.uuid4()),
            job.get("--root-partuuid") or partuuid,
            job.get("--esp-id") or uuid.uuid4().hex[:8].upper())


def sfdisk_script(table: str, esp_size: str, root_partuuid: str) -> str:
    """The recipe's partition table as sfdisk input (the same as mkimage.sh writes)."""
    if table == "gpt":
        return (f"label: gpt\nlabel-id: {uuid.uuid4()}\n"
                f'size={esp_size}, type={ESP_TYPE}, uuid={uuid.uuid4()}, name="esp"\n'
                f'type={ROOT_TYPE}, uuid={root_partuuid}, name="root"\n')
    disk_id = root_partuuid.removesuffix("-01")
    return f"label: dos\nlabel-id: 0x{disk_id}\ntype=83, bootable\n"


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


def _partition(image: Path, job: Job, ids: tuple[str, str, str]) -> tuple[int, int]:
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
                                              ids[1]),
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
    proc = subprocess.run([str(tools["mkfs.vfat"]), "-F", "32", "-n", "ESP", "-i", ids[2],
                           "-s", str(fat32_cluster_sectors(esp_size)),
                           f"--offset={esp_offset // 512}", str(image),
                           str(esp_size // 1024)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HshelperError(f"mkimage: making the ESP in {image} failed: "
                            f"{proc.stderr.strip()}", status=1)
    return root


@dataclass
class Fill:
    """A host fill: checked and partitioned before the VM starts, the filesystem then
    written while the guest boots (the boot takes seconds under TCG, the fill about as
    long, and the machine has a second core). The guest waits for ``marker.ok``
    before it touches the disks; a failure writes ``marker.err`` with the reason."""

    source: Path
    kind: str  # ext4fill.source_kind's answer
    fs: ext4fill.Ext4
    marker: Path | None  # None: fill before the VM starts
    thread: threading.Thread | None = None
    done: str = ""
    error: BaseException | None = None
    started: float = 0.0
    seconds: float = 0.0

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            self.done = ext4fill.fill(self.source, self.fs, self.fs.image.parent, self.kind)
        except BaseException as err:  # noqa: BLE001 - reported through the marker
            self.error = err
            self.fs.image.unlink(missing_ok=True)  # as the recipe does on failure
        self.seconds = time.monotonic() - self.started
        if self.marker:
            if self.error:
                self.flag("err").write_text(
                    f"hshelper: mkimage: filling the root on the host failed: "
                    f"{self.error}\n")
            else:
                self.flag("ok").touch()

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


# The fill of the current run (one run a process).
_fills: list[Fill] = []


def prepare(job: Job, image: Path, cwd: Path, ids: tuple[str, str, str],
            marker: Path | None) -> Fill:
    """Check the source, partition ``image``; the :class:`Fill` that writes the root.

    Raises :class:`ext4fill.Unsupported` before anything is written when the guest
    has to do the fill instead."""
    source = cwd / job.root
    kind = ext4fill.source_kind(source)
    if kind is None:
        raise ext4fill.Unsupported(f"ROOT {job.root} is not a directory or tarball on "
                                   "the host")
    if kind != "dir":
        ext4fill.scan(source, kind)
    offset, size = _partition(image, job, ids)
    fs = ext4fill.Ext4(image, offset, size, job.get("--label", "root"), ids[0],
                       ("^64bit",) if job.extlinux else ())
    return Fill(source, kind, fs, marker)


def wait_code(marker: Path) -> str:
    """Guest setup code: wait for the host's fill (over the shared directory)."""
    # The share is where the command sees it: under $hsh_newroot, from the init.
    ok = '"$hsh_newroot"' + quote(f"{marker}.ok")
    err = '"$hsh_newroot"' + quote(f"{marker}.err")
    return (f"while [ ! -e {ok} ]; do\n"
            f"  if [ -e {err} ]; then cat {err} >&2; return 1; fi\n"
            "  sleep 0.05\n"
            "done\n")


@hookimpl
def hshelper_config_keys():
    return [Key("mkimage", "host_fill", bool, True,
                "--recipe mkimage: write the partition table and the ext4 root on the "
                "host (fast), not in the VM")]


@hookimpl
def hshelper_add_arguments(parser, command):
    if command == "run":
        parser.add_argument("--guest-fill", action="store_true",
                            help="with --recipe mkimage: fill the root in the VM, not on the host")


def _out_disk(spec, job: Job, cwd: Path) -> tuple[Disk | None, bool]:
    """The disk named ``out``, attaching OUTPUT.part when --size asks for it; and
    whether this run made the file."""
    for disk in spec.disks:
        if disk.name == "out":
            return disk, False
    if "--size" not in job.options:
        return None, False
    size = parse_size(job.get("--size"))
    part = cwd / f"{job.output}.part"
    # OUTPUT.part is the recipe's own temporary name: a leftover of a killed run is
    # started over.
    with open(part, "wb") as fh:
        fh.truncate(size)
    return Disk(part, "out", "raw", size), True


@hookimpl
def hshelper_run_spec(spec, config, args):
    recipe = spec.extra.get("recipe")
    if recipe not in RECIPES:
        return None
    argv = list(spec.argv[1:])
    job = parse_job(recipe, argv)
    if job is None or "--device" in job.options or "--prefilled" in job.flags:
        return None
    cwd = Path(spec.cwd)
    out, made = _out_disk(spec, job, cwd)
    if out is None or out.path != (cwd / f"{job.output}.part").absolute():
        return None  # the recipe says what to attach
    disks = spec.disks if not made else (*spec.disks, out)
    # ROOT under /dev/ is a disk in the guest (--disk ...,name=src): nothing to fill from.
    want = (config.get("mkimage", "host_fill") and not getattr(args, "guest_fill", False)
            and job.get("--fs", "ext4") == "ext4" and out.format == "raw"
            and not job.root.startswith("/dev/"))
    if want:
        # The guest can wait for a fill running alongside its boot when it sees the
        # working directory (the markers are there).
        overlap = (not getattr(args, "no_share_cwd", False) and spec.cwd != "/"
                   and config.get("run", "mode") == "image")
        marker = cwd / f".hshelper-fill-{uuid.uuid4().hex[:12]}" if overlap else None
        ids = identifiers(job)
        try:
            fill = prepare(job, out.path, cwd, ids, marker)
        except ext4fill.Unsupported as why:
            print(f"hshelper: mkimage: filling the root in the VM: {why}", file=sys.stderr)
        except BaseException:
            out.path.unlink(missing_ok=True)  # as the recipe does: no half-made image
            raise
        else:
            _fills.append(fill)
            extra = dict(spec.extra)
            if marker:
                fill.start()
                extra["mkimage_marker"] = str(marker)
            else:
                fill.run()
                if fill.error:
                    raise fill.error
                _report(fill, spec.verbose)
            given = ["--prefilled", "--root-uuid", ids[0], "--root-partuuid", ids[1]]
            argv[:0] = given + (["--esp-id", ids[2]] if job.table == "gpt" else [])
            return dataclasses.replace(spec, argv=(spec.argv[0], *argv), disks=disks,
                                       extra=extra)
    root = cwd / job.root
    if (not any(d.name == "src" for d in disks)
            and ext4fill.source_kind(root) == "tar"):
        # A plain tarball is read fastest as a disk (the share costs 10 % more).
        disks = (*disks, Disk(root.absolute(), "src", "raw", None, True))
        argv[job.root_index] = SRC_DISK
    return dataclasses.replace(spec, argv=(spec.argv[0], *argv), disks=disks)


def _report(fill: Fill, verbose: bool) -> None:
    if verbose:
        print(f"hshelper: mkimage: root filled on the host in {fill.seconds:.2f} s: "
              f"{fill.done}", file=sys.stderr)


@hookimpl
def hshelper_guest_setup(spec):
    marker = spec.extra.get("mkimage_marker")
    return [("mkimage-fill", wait_code(Path(marker)))] if marker else []


@hookimpl(hookwrapper=True)
def hshelper_run_vm(spec):
    try:
        yield
    finally:
        while _fills:
            fill = _fills.pop()
            fill.finish()
            if fill.marker and not fill.error:
                _report(fill, spec.verbose)

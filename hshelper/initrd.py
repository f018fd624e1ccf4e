"""The image stage: plugins' contents -> a plan -> a cached, compressed initrd.

``build_image(host, sysroot, config)`` is the one public entry point. Planning only
stats files and reads ELF headers, so a cache hit costs milliseconds: the cache key is
a hash of every planned entry (path, type, mode, and the source's size, mtime and inode
or the generated data's hash) plus the kernel and the options. Only a miss reads the
files, writes the archive and compresses it, under a temporary name renamed into place.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import hshelper.plugins as builtin_plugins
from hshelper import __version__, cache, cpio, elf, guestabi, kmod, packages, rootpath, runner
from hshelper.errors import HshelperError
from hshelper.model import Contents, ImageResult, Program
from hshelper.qemu.machines import Choice
from hshelper.sysroot import DEFAULT_PATH, Kernel, Sysroot

# Fastest to unpack first: under TCG the guest's decompression time is boot time. No lz4:
# the kernel's decoder of the legacy lz4 frame fails when another archive follows it, and
# every run appends one.
COMPRESSION_ORDER = ("zstd", "gzip", "xz")
KCONFIG_FOR = {"zstd": "CONFIG_RD_ZSTD", "gzip": "CONFIG_RD_GZIP", "xz": "CONFIG_RD_XZ"}
MODULE_DIR = guestabi.MODULE_DIR
APPLET_DIR = guestabi.APPLET_DIR
STANDARD_DIRS = ("/bin", "/sbin", "/lib", "/lib64", "/usr/bin", "/usr/sbin", "/usr/lib",
                 "/usr/lib64")


@dataclass(frozen=True)
class PlanEntry:
    """One archive member before any file is read.

    ``source`` is a host path to copy (``decompress``: a kernel module to unpack first;
    ``unsigned``: and to strip of its signature),
    ``data`` generated content, ``target`` a symlink target, ``rdev`` a device number.
    ``stamp`` identifies the source's current content cheaply (size, mtime_ns, inode).
    """

    path: str
    kind: str  # "dir", "file", "link", "chr", "blk"
    mode: int
    origin: str
    source: str | None = None
    data: bytes | None = None
    target: str | None = None
    rdev: tuple[int, int] = (0, 0)
    decompress: bool = False
    stamp: tuple[int, ...] = ()
    unsigned: bool = False

    def key_material(self) -> list:
        content = hashlib.sha256(self.data).hexdigest() if self.data is not None else None
        return [self.path, self.kind, self.mode, self.source, content, self.target,
                list(self.rdev), self.decompress, list(self.stamp), self.unsigned]


@dataclass(frozen=True)
class ImagePlan:
    kernel: Kernel
    kernel_host: Path
    kernel_stamp: tuple[int, ...]
    entries: tuple[PlanEntry, ...]
    compression: str
    mtime: int
    modules: tuple[str, ...]
    missing: tuple[str, ...]
    features: frozenset[str]
    # Host paths whose change could change the plan (sources, their directories, the
    # PATH and module index files): what a warm run re-checks instead of re-planning.
    watch: tuple[str, ...] = ()

    def key(self) -> str:
        material = [__version__, self.kernel.version, str(self.kernel_host),
                    list(self.kernel_stamp), self.compression, self.mtime,
                    [e.key_material() for e in self.entries]]
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:32]


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class _PlanBuilder:
    """Collects entries, replicating the build root's directories and symlinks."""

    sysroot: Sysroot
    entries: dict[str, PlanEntry] = field(default_factory=dict)
    watch: set[str] = field(default_factory=set)

    def _put(self, entry: PlanEntry) -> None:
        old = self.entries.get(entry.path)
        if old is not None and old.kind != entry.kind:
            raise HshelperError(f"image entry {entry.path} is both a {old.kind} "
                                f"({old.origin}) and a {entry.kind} ({entry.origin})")
        if old is None or entry.kind != "dir":
            self.entries[entry.path] = entry

    def directory(self, path: str, origin: str, mode: int = 0o755) -> None:
        path = rootpath.normalize(path)
        if path == "/":
            return
        self.directory(os.path.dirname(path), origin)
        if path not in self.entries:
            self._put(PlanEntry(path, "dir", mode, origin))

    def _parents(self, path: str, origin: str) -> None:
        """Create the parents of a resolved path with the build root's modes."""
        parent = os.path.dirname(path)
        chain = []
        while parent != "/" and parent not in self.entries:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            try:
                mode = stat.S_IMODE(os.lstat(self.sysroot.host(directory)).st_mode)
            except OSError:
                mode = 0o755
            self._put(PlanEntry(directory, "dir", mode, origin))

    def from_root(self, guest: str, origin: str, dest: str | None = None) -> str:
        """Copy a build-root path (and every symlink on the way) into the image.

        Returns the resolved guest path. ``dest`` puts a file elsewhere in the image.
        """
        resolved = self.sysroot.resolve(guest)
        for link, target in resolved.links:
            self._parents(link, origin)
            self._put(PlanEntry(link, "link", 0o777, origin, target=target))
            self.watch.add(os.path.dirname(self.sysroot.host(link)))
        st = os.stat(resolved.host)
        self.watch.update((str(resolved.host), os.path.dirname(resolved.host)))
        where = dest or resolved.path
        self._parents(where, origin)
        if stat.S_ISDIR(st.st_mode):
            self._put(PlanEntry(where, "dir", stat.S_IMODE(st.st_mode), origin))
        elif stat.S_ISREG(st.st_mode):
            if not os.access(resolved.host, os.R_OK):
                raise HshelperError(f"{resolved.path} in the build root is not readable by "
                                    f"uid {os.getuid()}", hint=f"chmod a+r {resolved.path}")
            self._put(PlanEntry(where, "file", stat.S_IMODE(st.st_mode), origin,
                                source=str(resolved.host), stamp=_stamp(st)))
        else:
            raise HshelperError(f"{resolved.path}: only files and directories can be copied "
                                "into the image")
        return resolved.path

    def generated(self, path: str, data: bytes, mode: int, origin: str) -> None:
        self._parents(path, origin)
        self._put(PlanEntry(path, "file", mode, origin, data=data))

    def link(self, path: str, target: str, origin: str) -> None:
        self._parents(path, origin)
        self._put(PlanEntry(path, "link", 0o777, origin, target=target))


def merge_contents(parts: list[Contents]) -> Contents:
    """Merge the plugins' contributions in order, de-duplicating where it is safe."""
    programs: dict[str, Program] = {}
    for part in parts:
        for prog in part.programs:
            old = programs.get(prog.name)
            programs[prog.name] = prog if old is None else Program(
                prog.name, old.required or prog.required, old.applet and prog.applet,
                old.prefer_applet or prog.prefer_applet, old.essential or prog.essential)
    modules = list(dict.fromkeys(m for p in parts for m in p.modules))
    return Contents(
        modules=tuple(modules),
        programs=tuple(programs.values()),
        files=tuple(f for p in parts for f in p.files),
        directories=tuple(dict.fromkeys(d for p in parts for d in p.directories)),
        devices=tuple(d for p in parts for d in p.devices),
        init_steps=tuple(s for p in parts for s in p.init_steps),
    )


@dataclass(frozen=True)
class ProgramChoice:
    """The files the chosen programs need, and the optional programs left out (with
    what they would have cost)."""

    files: tuple[str, ...]
    left_out: tuple[str, ...]


def _guest_size(root: Path, guest: str) -> int:
    try:
        return rootpath.resolve(root, guest).host.stat().st_size
    except (OSError, rootpath.RootPathError):
        return 0


def choose_programs(root: Path, must: list[str], optional: dict[str, str],
                    budget: int) -> ProgramChoice:
    """The ELF closure of ``must`` plus every ``optional`` program (name -> guest path)
    whose own additions (its files and libraries beyond what ``must`` already needs)
    weigh at most ``budget`` bytes; 0 means no limit.

    Why a budget: a few programs drag in most of an image (sgdisk brings 3 MB of
    libstdc++ and libm, bash and zstd about 1.4 MB each), while every byte is unpacked
    at each boot. What is left out is named, with the ``--with`` that adds it.
    """
    cache: dict = {}
    have = set(elf.elf_closure(root, sorted(set(must)), cache=cache).files)
    kept, left_out = [], []
    own = {name: set(elf.elf_closure(root, [path], cache=cache).files)
           for name, path in optional.items()} if budget else {}

    def cost(name: str) -> int:
        return sum(_guest_size(root, f) for f in own[name] - have)

    # Cheapest first, each judged by what it adds to what is already in: programs that
    # share libraries (fdisk after sfdisk) then count only once.
    for name in sorted(optional, key=lambda n: (cost(n), n) if budget else (0, n)):
        if budget:
            extra = cost(name)
            if extra > budget:
                left_out.append(f"{name} ({extra / 1e6:.1f} MB with its libraries, over "
                                f"image.program_budget_kb; --with {name} adds it)")
                continue
            have |= own[name]
        kept.append(optional[name])
    closure = elf.elf_closure(root, sorted(set(must) | set(kept)), cache=cache)
    if closure.missing:
        needed, by = closure.missing[0]
        raise HshelperError(f"shared library {needed} needed by {by} is not in the build root")
    return ProgramChoice(closure.files, tuple(left_out))


def choose_compression(wanted: str, kconfig: dict[str, str], available) -> str:
    """The initrd compression: ``wanted`` if the kernel can unpack it, or for "auto"
    the first of COMPRESSION_ORDER the kernel supports and we can produce.

    ``available(name)`` tells whether we can produce a format. A kernel whose config is
    unknown gets gzip, which every initramfs-capable kernel unpacks.
    """
    if wanted == "none":
        return "none"
    if wanted != "auto" and wanted not in KCONFIG_FOR:
        raise HshelperError(f"unknown initrd compression {wanted!r} (one of auto, none, "
                            f"{', '.join(KCONFIG_FOR)})")
    if wanted != "auto":
        if kconfig and kconfig.get(KCONFIG_FOR[wanted]) != "y":
            raise HshelperError(f"the kernel cannot unpack a {wanted} initrd "
                                f"({KCONFIG_FOR[wanted]} is not set)")
        return wanted
    if not kconfig:
        return "gzip"
    for name in COMPRESSION_ORDER:
        if kconfig.get(KCONFIG_FOR[name]) == "y" and available(name):
            return name
    return "none"


def _can_produce(name: str) -> bool:
    if name in ("gzip", "xz", "none"):
        return True
    return shutil.which(name) is not None


def compress(data: bytes, how: str) -> bytes:
    """Compress the archive the way the kernel's initramfs unpacker accepts."""
    if how == "none":
        return data
    if how == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if how == "xz":
        # The kernel's xz decoder knows CRC32 only, not the default CRC64.
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if how == "zstd":
        return runner.pipe(["zstd", "-q", "-c", "-T0", "-3"], data, hint="install zstd")
    raise HshelperError(f"unknown compression {how}")


def find_kernel(host, sysroot: Sysroot, config) -> tuple[Kernel, Choice]:
    """The kernel to boot and the machine that runs it."""
    version = config.get("image", "kernel") or None
    kernel = host.hook.hshelper_find_kernel(sysroot=sysroot, version=version, config=config)
    if kernel is None:
        raise HshelperError("no plugin found a kernel", hint=sysroot.kernel_package_hint())
    choice = host.hook.hshelper_machine(sysroot=sysroot, kernel=kernel, config=config)
    return kernel, choice


def gather(host, sysroot: Sysroot, config) -> tuple[Kernel, Contents]:
    """The kernel and what the plugins want in the image (cheap: nothing resolved)."""
    kernel, choice = find_kernel(host, sysroot, config)
    parts = [c for c in host.hook.hshelper_image_contents(
        sysroot=sysroot, kernel=kernel, config=config, machine=choice.machine)
        if c is not None]
    # pluggy calls the last registered first; merge in registration order instead.
    return kernel, merge_contents(list(reversed(parts)))


def plan_image(host, sysroot: Sysroot, config,
               gathered: tuple[Kernel, Contents] | None = None) -> ImagePlan:
    """Turn the plugins' contributions into a plan (no file content read but modules'
    own metadata when the kernel has no modules.dep)."""
    kernel, contents = gathered or gather(host, sysroot, config)
    builder = _PlanBuilder(sysroot)
    missing: list[str] = []

    # The build root's top-level layout, links included (/bin -> usr/bin on merged-/usr
    # roots), so "#!/bin/sh" and the ELF interpreter's path work in the guest.
    for directory in STANDARD_DIRS:
        if sysroot.exists(directory):
            builder.from_root(directory, "layout")
    for directory in contents.directories:
        builder.directory(directory, "base")
    for device in contents.devices:
        builder._parents(device.path, "device")
        builder._put(PlanEntry(device.path, "chr" if device.kind == "c" else "blk",
                               device.mode, "device", rdev=(device.major, device.minor)))

    # Programs: real ones go through the ELF closure; applets become links to busybox.
    must: list[str] = []
    optional: dict[str, str] = {}
    busybox = sysroot.busybox
    for prog in contents.programs:
        real = sysroot.which(prog.name)
        has_applet = bool(busybox) and prog.name in sysroot.applets
        if has_applet and prog.applet and (prog.prefer_applet or real is None):
            must.append(busybox)
            # Applets live apart, last on the command's PATH: they stand in only for
            # programs the build root lacks, never in front of an installed one.
            builder.link(f"{APPLET_DIR}/{os.path.basename(prog.name)}", busybox,
                         "busybox applet")
        elif real is not None:
            if prog.required or prog.essential:
                must.append(real)
            else:
                optional[prog.name] = real
        elif prog.required:
            raise HshelperError(
                f"program {prog.name} is not installed in the build root {sysroot.root}",
                hint=packages.install_hint(prog.name, sysroot.os_release))
        else:
            missing.append(prog.name)
    for file in contents.files:
        if file.data is not None:
            builder.generated(file.dest, file.data, file.mode, "generated")
        elif file.source is not None:
            builder.from_root(file.source, "file", dest=file.dest)
            must.append(file.source)
    choice = choose_programs(sysroot.root, must, optional,
                             config.get("image", "program_budget_kb") * 1024)
    missing += choice.left_out
    for path in choice.files:
        builder.from_root(path, "program")

    # Kernel modules, resolved and ordered on the host.
    kconfig = sysroot.kernel_config(kernel)
    unsigned = bool(kconfig) and kconfig.get("CONFIG_MODULE_SIG_FORCE") != "y"
    features: set[str] = set()
    module_names: tuple[str, ...] = ()
    if kernel.moddir:
        moddir_host = sysroot.resolve(kernel.moddir).host
        builder.watch.add(str(moddir_host))
        builder.watch.update(str(moddir_host / n) for n in kmod.INDEX_FILES)
        tree = kmod.load_tree(moddir_host, cache_root(config) / "modindex")
        wanted = kmod.parse_list("\n".join(contents.modules), "image modules")
        plan = kmod.closure(tree, wanted)
        missing += [f"module {w.name}" for w in plan.skipped]
        module_names = tuple(name for name, _ in plan.order)
        features = set(module_names) | set(plan.builtin)
        for name, rel in plan.order:
            source = tree.moddir / rel
            builder._parents(f"{MODULE_DIR}/{name}.ko", "module")
            builder._put(PlanEntry(f"{MODULE_DIR}/{name}.ko", "file", 0o644, f"module {rel}",
                                   source=str(source), decompress=True,
                                   stamp=_stamp(os.stat(source)), unsigned=unsigned))
        builder.generated("/hshelper/modules.list",
                          "".join(f"{n}\n" for n in plan.boot).encode(), 0o644, "generated")
        builder.generated("/hshelper/modules.table",
                          kmod.modprobe_table(tree, plan).encode(), 0o644, "generated")
        # For busybox's modprobe, which loads a list of modules in one program start.
        # Written where /lib leads (usr/lib in a merged-/usr image): the archive is
        # unpacked in order, and usr/lib may come after lib/modules.
        lib = builder.entries.get("/lib")
        base = rootpath.normalize("/" + lib.target) if lib and lib.kind == "link" and \
            lib.target else "/lib"
        builder.directory(f"{base}/modules/{kernel.version}", "generated")
        builder.generated(f"{base}/modules/{kernel.version}/modules.dep",
                          kmod.flat_depfile(module_names, MODULE_DIR).encode(), 0o644,
                          "generated")
    elif contents.modules:
        missing.append("all modules (the kernel has no module directory)")
    for number, (name, code) in enumerate(contents.init_steps):
        builder.generated(f"/hshelper/init.d/{number:02d}-{name}", code.encode(), 0o644,
                          f"init step {name}")

    kernel_host = sysroot.resolve(kernel.image).host
    compression = choose_compression(config.get("image", "compression"), kconfig,
                                     _can_produce)
    mtime = source_date_epoch()
    for directory in DEFAULT_PATH:  # a program installed later changes the plan
        builder.watch.add(str(sysroot.host(directory)))
    if kernel.config:
        builder.watch.add(str(sysroot.host(kernel.config)))
    return ImagePlan(kernel, kernel_host, _stamp(os.stat(kernel_host)),
                     tuple(sorted(builder.entries.values(), key=lambda e: e.path)),
                     compression, mtime, module_names, tuple(missing), frozenset(features),
                     tuple(sorted(builder.watch)))


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)


# ---------------------------------------------------------------- the warm path


def watch_stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode]


def tree_digest(packages: dict[str, Path]) -> str:
    """A digest of the Python files and guest scripts under each named directory."""
    digest = hashlib.sha256()
    for name, top in sorted(packages.items()):
        for path in sorted([*top.rglob("*.py"), *top.glob("guest/*")]):
            if path.is_file():
                digest.update(f"{name}/{path.relative_to(top)}".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """hshelper's own code, with its built-in plugins (which a development checkout keeps
    beside the package, not in it): a plan or a saved state made by other code (a
    checkout being worked on, an upgrade without a version change) must not be reused."""
    return tree_digest({"hshelper": Path(__file__).resolve().parent,
                        "hshelper.plugins": Path(builtin_plugins.__path__[0]).resolve()})


def quick_key(sysroot: Sysroot, kernel: Kernel, contents: Contents, config) -> str:
    """What decides the plan before anything is resolved: the hshelper version and
    code, the root, the kernel file, the plugins' contributions and the image options."""
    kernel_host = sysroot.resolve(kernel.image).host
    material = [__version__, code_digest(), str(sysroot.root), repr(kernel),
                watch_stamp(str(kernel_host)),
                repr(contents), config.get("image", "compression"),
                config.get("image", "program_budget_kb"), source_date_epoch(),
                sorted(os.environ.get(k, "") for k in ("PATH",))]
    return hashlib.sha256(json.dumps(material, default=str).encode()).hexdigest()[:32]


def summary(plan: ImagePlan) -> dict:
    """What an image's info.json (and the warm-path memo) say about it."""
    return {"kernel_version": plan.kernel.version, "kernel": str(plan.kernel_host),
            "compression": plan.compression, "modules": list(plan.modules),
            "missing": list(plan.missing), "features": sorted(plan.features),
            "files": len(plan.entries)}


def _result(info: dict, final: Path, key: str, cached: bool, start: float) -> ImageResult:
    return ImageResult(
        kernel_version=info["kernel_version"], kernel=Path(info["kernel"]),
        initrd=final / "initrd", manifest=final / "manifest.json", key=key, cached=cached,
        seconds=time.monotonic() - start, size=(final / "initrd").stat().st_size,
        compression=info["compression"], modules=tuple(info["modules"]),
        files=info["files"], missing=tuple(info["missing"]),
        features=frozenset(info["features"]))


def _memo_write(path: Path, plan: ImagePlan, key: str) -> None:
    memo = {"image": key, "watch": [[p, watch_stamp(p)] for p in plan.watch], **summary(plan)}
    with contextlib.suppress(OSError):
        cache.write_json(path, memo)


def _memo_read(path: Path) -> dict | None:
    """The memo when every watched path is as it was when the plan was made."""
    memo = cache.read_json(path, "image plan")
    if not isinstance(memo, dict):
        return None
    for watched, stamp in memo.get("watch", []):
        if watch_stamp(watched) != stamp:
            return None
    return memo


def archive_entries(plan: ImagePlan) -> list[cpio.Entry]:
    """Read the planned files and make archive entries (the only reading step)."""
    out = []
    for e in plan.entries:
        if e.kind == "dir":
            out.append(cpio.directory(e.path, e.mode))
        elif e.kind == "link":
            out.append(cpio.symlink(e.path, e.target or ""))
        elif e.kind == "chr":
            out.append(cpio.chardev(e.path, *e.rdev, perm=e.mode))
        elif e.kind == "blk":
            out.append(cpio.blockdev(e.path, *e.rdev, perm=e.mode))
        elif e.source is not None:
            source = Path(e.source)
            data = kmod.decompress_module(source) if e.decompress else source.read_bytes()
            if e.unsigned:
                data = kmod.strip_signature(data)
            out.append(cpio.regular(e.path, data, e.mode))
        else:
            out.append(cpio.regular(e.path, e.data or b"", e.mode))
    return out


def manifest_lines(plan: ImagePlan, entries: list[cpio.Entry]) -> list[dict]:
    sizes = {e.name: len(e.data) for e in entries}
    kinds = {"dir": "directory", "file": "file", "link": "symlink",
             "chr": "char-device", "blk": "block-device"}
    out = []
    for e in plan.entries:
        item = {"path": e.path, "type": kinds[e.kind], "mode": f"{e.mode:04o}",
                "size": sizes.get(e.path, 0), "origin": e.origin}
        if e.target is not None:
            item["target"] = e.target
        if e.kind in ("chr", "blk"):
            item["device"] = f"{e.rdev[0]}:{e.rdev[1]}"
        out.append(item)
    return out


def cache_root(config) -> Path:
    return cache.root(config)


def discard(image: ImageResult) -> None:
    """Remove an image from the cache (it proved damaged); the next run rebuilds it."""
    shutil.rmtree(image.initrd.parent, ignore_errors=True)


def _whole(final: Path) -> bool:
    """Whether a cached image is there and undamaged; a damaged one is removed."""
    if not (final / "initrd").is_file():
        return False
    problem = cache.damage(final / "initrd")
    if problem is None:
        return True
    print(f"hshelper: the cached helper image {final} was damaged ({problem}); "
          "building it again", file=sys.stderr)
    shutil.rmtree(final, ignore_errors=True)
    return False


def build_image(host, sysroot: Sysroot, config) -> ImageResult:
    """Plan the image, and build it unless the cache has it. Returns the ImageResult.

    Warm path: a memo keyed by :func:`quick_key` remembers the last plan's image key and
    the stamps of every path the plan depended on; when none changed, the image is a
    cache hit without resolving programs, reading ELF headers or module indexes.
    """
    start = time.monotonic()
    kernel, contents = gather(host, sysroot, config)
    root = cache_root(config)
    memo_path = root / "plans" / quick_key(sysroot, kernel, contents, config)
    memo = _memo_read(memo_path)
    if memo is not None and _whole(root / "images" / memo["image"]):
        final = root / "images" / memo["image"]
        result = _result(memo, final, memo["image"], True, start)
        with contextlib.suppress(OSError):
            os.utime(final)
        host.hook.hshelper_image_built(image=result)
        return result

    plan = plan_image(host, sysroot, config, (kernel, contents))
    key = plan.key()
    final = root / "images" / key
    cached = _whole(final)
    if not cached:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            entries = archive_entries(plan)
            data = compress(cpio.write_archive(entries, plan.mtime), plan.compression)
            (work / "initrd").write_bytes(data)
            cache.record(work / "initrd")
            with open(work / "manifest.json", "w") as fh:
                for item in manifest_lines(plan, entries):
                    fh.write(json.dumps(item, sort_keys=True) + "\n")
            (work / "info.json").write_text(json.dumps(summary(plan), indent=1) + "\n")
            try:
                os.rename(work, final)
            except OSError:
                # Another build of the same key won the race: theirs is identical.
                if not (final / "initrd").is_file():
                    raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    _memo_write(memo_path, plan, key)
    with contextlib.suppress(OSError):
        os.utime(final)  # "recently used", for `hshelper clean --older-than`
    result = _result(summary(plan), final, key, cached, start)
    host.hook.hshelper_image_built(image=result)
    return result


def decompress(data: bytes, how: str) -> bytes:
    """The inverse of :func:`compress`."""
    if how == "none":
        return data
    if how == "gzip":
        return gzip.decompress(data)
    if how == "xz":
        return lzma.decompress(data)
    if how == "zstd":
        return kmod.zstd_decompress(data)
    raise HshelperError(f"unknown compression {how}")


def boot_initrd(image: ImageResult, accel: str) -> Path:
    """The initrd file to boot: the image's own, or under TCG its uncompressed twin,
    made once beside it. Under TCG the guest's decompression is emulated code: an
    uncompressed archive (about 3x the bytes, copied by qemu at host speed) boots half
    a second sooner; under KVM decompressing is cheap and the smaller file wins."""
    if accel != "tcg" or image.compression == "none":
        return image.initrd
    plain = image.initrd.with_name("initrd.cpio")
    if plain.exists():
        problem = cache.damage(plain)
        if problem is None:
            return plain
        print(f"hshelper: the cached uncompressed initrd {plain} was damaged ({problem}); "
              "making it again", file=sys.stderr)
        cache.discard(plain)
    return cache.write_checked(plain, decompress(image.initrd.read_bytes(), image.compression))


def write_output(image: ImageResult, directory: Path) -> list[Path]:
    """``--output DIR``: the kernel, the initrd and the manifest, side by side."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for source, name in ((image.kernel, f"vmlinuz-{image.kernel_version}"),
                         (image.initrd, f"initrd-{image.kernel_version}.img"),
                         (image.manifest, "manifest.json")):
        target = directory / name
        tmp = directory / f".{name}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        written.append(target)
    return written

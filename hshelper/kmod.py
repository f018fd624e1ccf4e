"""Kernel modules: the list format, the dependency closure and the load order.

Everything here is computed on the host so the guest needs no depmod and no
``modules.dep``: modules go into the image as plain ``.ko`` files (decompressed on the
host, so any insmod, busybox's included, can load them). Device drivers marked "at boot"
are insmod-ed by the guest init in a precomputed order; the rest (filesystems, loop,
crypto) are loaded when the guest kernel asks for them (``request_module``) through a
small table-driven modprobe (guest/modprobe, :func:`modprobe_table`), so a run pays only
for the modules it uses. Dependencies come from ``modules.dep`` when the kernel
package's postinstall made one, otherwise from each module's own ``.modinfo`` section.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hshelper.elf import section_data
from hshelper.errors import HshelperError

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
# The files of a module directory that load_tree reads.
INDEX_FILES = ("modules.dep", "modules.alias", "modules.softdep", "modules.builtin",
               "modules.devname")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports '_'."""
    return name.replace("-", "_")


def module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return canonical(base[: -len(suffix)])
    return canonical(base)


# ---------------------------------------------------------------- the list format


@dataclass(frozen=True)
class Wanted:
    """A module named by a list: ``optional`` ones may be absent; ``boot`` ones are loaded
    by the guest init (device drivers: nothing asks the kernel for them); ``origin`` is
    file:line."""

    name: str
    optional: bool
    origin: str
    boot: bool = False

    def spec(self) -> str:
        """Back to the list syntax."""
        return self.name + ("?" if self.optional else "") + ("!" if self.boot else "")


def parse_list(text: str, origin: str,
               include: Callable[[str], tuple[str, str]] | None = None,
               _depth: int = 0) -> list[Wanted]:
    """Parse ``kernel-modules.lst`` text.

    One module a line; ``#`` starts a comment; a trailing ``?`` marks a module optional,
    a trailing ``!`` one loaded at boot (both may be given); ``include FILE`` reads
    another list (``include`` gets FILE and returns its text and its origin name).
    Raises HshelperError with file:line on a malformed line.
    """
    if _depth > 8:
        raise HshelperError(f"{origin}: includes nested too deeply (a loop?)")
    out: list[Wanted] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        where = f"{origin}:{number}"
        if not line:
            continue
        words = line.split()
        if words[0] == "include":
            if len(words) != 2 or include is None:
                raise HshelperError(f"{where}: 'include' takes one file name")
            sub_text, sub_origin = include(words[1])
            out += parse_list(sub_text, sub_origin, include, _depth + 1)
            continue
        match = re.fullmatch(r"([A-Za-z0-9_\-]+)([?!]{0,2})", line)
        if len(words) != 1 or not match or len(set(match.group(2))) != len(match.group(2)):
            raise HshelperError(f"{where}: expected one module name per line, got {raw.strip()!r}")
        flags = match.group(2)
        out.append(Wanted(canonical(match.group(1)), "?" in flags, where, "!" in flags))
    return out


def read_list(path: Path) -> list[Wanted]:
    """Read a module list file, following includes relative to the including file."""

    def include(name: str) -> tuple[str, str]:
        target = (path.parent / name) if not os.path.isabs(name) else Path(name)
        try:
            return target.read_text(), str(target)
        except OSError as exc:
            raise HshelperError(f"{path}: cannot include {name}: {exc.strerror}") from exc

    try:
        text = path.read_text()
    except OSError as exc:
        raise HshelperError(f"cannot read module list {path}: {exc.strerror}") from exc
    return parse_list(text, str(path), include)


# ---------------------------------------------------------------- the module tree


@dataclass
class ModuleTree:
    """What one kernel's module directory offers.

    ``paths``: module name -> path relative to the module dir; ``deps``: name -> names it
    needs (filled lazily from .modinfo when there is no modules.dep); ``builtin``: names
    compiled into the kernel; ``aliases``: alias -> module names (exact ones, for
    lookups by name); ``requests``: module -> the alias patterns the kernel's
    request_module() may ask for it by (fs-ext4, char-major-10-237, crypto-crc32c);
    ``devnames``: module -> (device node, "c"/"b", major, minor) that loads it on open.
    """

    moddir: Path
    paths: dict[str, str]
    builtin: frozenset[str]
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    softdeps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    has_depfile: bool = False
    requests: dict[str, tuple[str, ...]] | None = None
    devnames: dict[str, tuple[str, str, int, int]] | None = None
    # What lazily read .modinfo sections said (trees without index files).
    _modinfo_requests: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    _modinfo_devnames: dict[str, tuple] = field(default_factory=dict, repr=False)

    def lookup(self, name: str) -> str | None:
        """The module name that provides ``name`` (itself, or via an exact alias)."""
        name = canonical(name)
        if name in self.paths or name in self.builtin:
            return name
        for target in self.aliases.get(name, ()):
            if target in self.paths or target in self.builtin:
                return target
        return None

    def providers(self, name: str) -> tuple[str, ...]:
        """Every module that provides ``name``: itself, or all its alias targets, as
        modprobe loads them all for an alias ("crc32c": the CPU's accelerated driver,
        which may not load on this CPU, and the generic one)."""
        name = canonical(name)
        if name in self.paths or name in self.builtin:
            return (name,)
        return tuple(t for t in self.aliases.get(name, ())
                     if t in self.paths or t in self.builtin)

    def dependencies(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(hard deps, soft pre-deps) of a loadable module."""
        if name not in self.deps:
            self._read_modinfo(name)
        return self.deps.get(name, ()), self.softdeps.get(name, ())

    def request_aliases(self, name: str) -> tuple[str, ...]:
        """The patterns request_module() may use for ``name`` (always including itself)."""
        if self.requests is None:
            self._read_modinfo(name)
            found = self._modinfo_requests.get(name, ())
        else:
            found = self.requests.get(name, ())
        return (name, *found)

    def devname(self, name: str) -> tuple[str, str, int, int] | None:
        if self.devnames is None:
            self._read_modinfo(name)
            return self._modinfo_devnames.get(name)
        return self.devnames.get(name)

    def _read_modinfo(self, name: str) -> None:
        if name in self._modinfo_requests:
            return
        entry = index_entry(modinfo(decompress_module(self.moddir / self.paths[name])))
        self._modinfo_requests[name] = tuple(entry["requests"])
        if entry["node"]:
            self._modinfo_devnames[name] = tuple(entry["node"])
        self.deps.setdefault(name, tuple(entry["depends"]))
        self.softdeps.setdefault(name, tuple(entry["pre"]))


def pre_softdeps(words: Iterable[str]) -> list[str]:
    """The "pre:" modules of a softdep ("pre: a b post: c"): only they matter for the
    load order."""
    pre, section = [], None
    for word in words:
        if word.endswith(":"):
            section = word[:-1]
        elif section == "pre":
            pre.append(canonical(word))
    return pre


class ModInfo(dict):
    """key -> first value of a .modinfo section, plus :meth:`get_all` for repeated keys."""

    def __init__(self, pairs: list[tuple[str, str]]):
        super().__init__()
        self.pairs = pairs
        for key, value in pairs:
            self.setdefault(key, value)

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


def modinfo(ko: bytes) -> ModInfo:
    """Parse the NUL-separated key=value strings of a module's .modinfo section."""
    data = section_data(ko, ".modinfo") or b""
    pairs = []
    for item in data.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            pairs.append((key, value))
    return ModInfo(pairs)


def _read_depfile(moddir: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    paths: dict[str, str] = {}
    deps: dict[str, tuple[str, ...]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, sep, rest = line.partition(":")
        if not sep:
            continue
        name = module_name(target)
        paths[name] = target
        deps[name] = tuple(module_name(d) for d in rest.split())
    return paths, deps


def _walk_modules(moddir: Path) -> dict[str, str]:
    paths: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(moddir):
        dirnames[:] = sorted(d for d in dirnames if d not in ("build", "source"))
        for base in sorted(filenames):
            if base.endswith(SUFFIXES):
                rel = os.path.relpath(os.path.join(dirpath, base), moddir)
                # depmod's rule: updates/ and extra/ override the stock tree.
                name = module_name(base)
                if name not in paths or rel.startswith(("updates/", "extra/")):
                    paths[name] = rel
    return paths


def _read_pairs_file(path: Path, keyword: str) -> dict[str, tuple[str, ...]]:
    """Read modules.alias / modules.softdep style files: "keyword KEY VALUE..." lines."""
    out: dict[str, list[str]] = {}
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == keyword:
            out.setdefault(canonical(words[1]), []).extend(words[2:])
    return {k: tuple(v) for k, v in out.items()}


def is_request_alias(alias: str) -> bool:
    """Aliases the kernel itself asks modprobe for; device modaliases (bus:...) are
    udev's business and never requested by the kernel, so they stay out of the image."""
    return ":" not in alias


def devname_from_aliases(aliases: Iterable[str]) -> tuple[str, str, int, int] | None:
    """(node, kind, major, minor) from a module's "devname:X" and "char-major-M-m"
    aliases: what depmod writes to modules.devname."""
    node = next((a[len("devname:"):] for a in aliases if a.startswith("devname:")), None)
    for alias in aliases:
        match = re.fullmatch(r"(char|block)-major-(\d+)-(\d+)", alias)
        if node and match:
            return node, match.group(1)[0], int(match.group(2)), int(match.group(3))
    return None


def _read_devnames(path: Path) -> dict[str, tuple[str, str, int, int]] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        words = line.split()
        match = len(words) == 3 and re.fullmatch(r"([cb])(\d+):(\d+)", words[2])
        if match:
            out[canonical(words[0])] = (words[1], match.group(1), int(match.group(2)),
                                        int(match.group(3)))
    return out


def _read_requests(path: Path) -> dict[str, tuple[str, ...]] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and is_request_alias(words[1]):
            out.setdefault(canonical(words[2]), []).append(words[1])
    return {k: tuple(v) for k, v in out.items()}


def load_tree(moddir: Path, index_cache: Path | None = None) -> ModuleTree:
    """Index a module directory (``/lib/modules/VERSION`` on the host side).

    Without modules.dep and with ``index_cache`` (a directory), every module's .modinfo
    is read once and the resulting index cached there; without either, dependencies are
    read lazily from the modules that are needed (aliases then resolve only by name).
    """
    try:
        builtin_text = (moddir / "modules.builtin").read_text()
    except OSError:
        builtin_text = ""
    builtin = frozenset(module_name(line) for line in builtin_text.split())
    aliases = {k: tuple(canonical(v) for v in vs)
               for k, vs in _read_pairs_file(moddir / "modules.alias", "alias").items()
               if "*" not in k and ":" not in k}
    if (moddir / "modules.dep").is_file():
        paths, deps = _read_depfile(moddir)
        softdeps = {}
        for name, words in _read_pairs_file(moddir / "modules.softdep", "softdep").items():
            softdeps[name] = tuple(pre_softdeps(words))
        # modules.softdep only lists modules that have one; the rest have none.
        for name in paths:
            softdeps.setdefault(name, ())
        return ModuleTree(moddir, paths, builtin, deps, softdeps, aliases, True,
                          requests=_read_requests(moddir / "modules.alias"),
                          devnames=_read_devnames(moddir / "modules.devname"))
    paths = _walk_modules(moddir)
    if index_cache is None:
        return ModuleTree(moddir, paths, builtin, aliases=aliases)
    index = _cached_index(moddir, paths, index_cache)
    return ModuleTree(
        moddir, paths, builtin,
        deps={n: tuple(v["depends"]) for n, v in index.items()},
        softdeps={n: tuple(v["pre"]) for n, v in index.items()},
        aliases=_exact_aliases(index), has_depfile=False,
        requests={n: tuple(v["requests"]) for n, v in index.items()},
        devnames={n: tuple(v["node"]) for n, v in index.items() if v["node"]})


def _exact_aliases(index: dict) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for name, entry in sorted(index.items()):
        for alias in entry["aliases"]:
            out.setdefault(canonical(alias), []).append(name)
    return {k: tuple(v) for k, v in out.items()}


def index_entry(info: ModInfo) -> dict:
    """What depmod would have written about one module, from its .modinfo."""
    pre = pre_softdeps(w for soft in info.get_all("softdep") for w in soft.split())
    aliases = info.get_all("alias")
    return {"depends": [canonical(d) for d in info.get("depends", "").split(",") if d],
            "pre": pre,
            "aliases": [a for a in aliases if "*" not in a and ":" not in a],
            "requests": [a for a in aliases if is_request_alias(a)],
            "node": devname_from_aliases(aliases)}


def _cached_index(moddir: Path, paths: dict[str, str], cache: Path) -> dict:
    """A depmod-like index of a module tree that has no modules.dep, built from every
    module's .modinfo (decompressing them: seconds for a whole tree) and cached under
    ``cache`` keyed by the files' sizes and mtimes."""
    stamps = []
    for name in sorted(paths):
        st = os.stat(moddir / paths[name])
        stamps.append([paths[name], st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps([str(moddir), stamps]).encode()).hexdigest()[:24]
    where = cache / f"{key}.json"
    try:
        return json.loads(where.read_text())
    except (OSError, ValueError):
        pass

    def one(name: str) -> tuple[str, dict]:
        return name, index_entry(modinfo(decompress_module(moddir / paths[name])))

    # Imported here: concurrent.futures brings logging, 4 ms of every run's start.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        index = dict(pool.map(one, sorted(paths)))
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = where.with_name(f".{where.name}.{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, where)
    return index


# ---------------------------------------------------------------- the closure


@dataclass(frozen=True)
class ModulePlan:
    """The result of :func:`closure`: the modules of the image in a valid load order
    (names, with their paths relative to the module dir), wanted names that are built in,
    optional ones that are absent, and ``boot``: the names the init loads, in order."""

    order: tuple[tuple[str, str], ...]
    builtin: tuple[str, ...]
    skipped: tuple[Wanted, ...]
    boot: tuple[str, ...] = ()
    needs: dict = field(default_factory=dict)  # name -> its own load order (deps first)


def closure(tree: ModuleTree, wanted: Iterable[Wanted]) -> ModulePlan:
    """Resolve ``wanted`` to a load order with every dependency before its users.

    Soft pre-dependencies are included when the kernel has them, never required.
    Raises HshelperError naming the first required module that does not exist.
    """
    order: list[tuple[str, str]] = []
    placed: set[str] = set()
    builtin: list[str] = []
    skipped: list[Wanted] = []
    visiting: set[str] = set()
    direct: dict[str, list[str]] = {}
    boot_roots: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in placed or name in tree.builtin:
            return
        if name in visiting:  # depmod refuses cycles; be as tolerant as modprobe is
            return
        visiting.add(name)
        hard, soft = tree.dependencies(name)
        mine = direct.setdefault(name, [])
        for dep in soft:
            providers = tree.providers(dep)
            if any(p in tree.builtin for p in providers):
                continue
            for found in providers:
                visit(found, (*chain, name))
                mine.append(found)
        for dep in hard:
            found = tree.lookup(dep)
            if found is None:
                raise HshelperError(
                    f"kernel module {dep} (needed by {' -> '.join((*chain, name))}) "
                    f"is missing from {tree.moddir}")
            visit(found, (*chain, name))
            mine.append(found)
        visiting.discard(name)
        placed.add(name)
        order.append((name, tree.paths[name]))

    for want in wanted:
        found = tree.lookup(want.name)
        if found is None:
            if want.optional:
                skipped.append(want)
                continue
            raise HshelperError(
                f"kernel module {want.name} ({want.origin}) is neither in {tree.moddir} "
                f"nor built into the kernel; mark it optional with '{want.name}?' "
                f"or install the package that provides it")
        if found in tree.builtin:
            if found not in builtin:
                builtin.append(found)
            continue
        visit(found, ())
        if want.boot:
            boot_roots.append(found)
    position = {name: i for i, (name, _) in enumerate(order)}

    def needs(name: str) -> tuple[str, ...]:
        seen: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current not in seen and current in position:
                seen.add(current)
                stack += direct.get(current, [])
        return tuple(sorted(seen, key=position.__getitem__))

    all_needs = {name: needs(name) for name, _ in order}
    boot = set().union(*(all_needs[n] for n in boot_roots)) if boot_roots else set()
    return ModulePlan(tuple(order), tuple(builtin), tuple(skipped),
                      tuple(sorted(boot, key=position.__getitem__)), all_needs)


def flat_depfile(names: Iterable[str], directory: str) -> str:
    """A modules.dep naming every module of the image without dependencies: the guest
    passes busybox modprobe -a the modules in load order itself (under TCG each program
    start costs about 60 ms, so one modprobe beats an insmod a module)."""
    return "".join(f"{directory}/{name}.ko:\n" for name in names)


def modprobe_table(tree: ModuleTree, plan: ModulePlan) -> str:
    """The guest modprobe's table for the modules in ``plan`` (see guest/modprobe).

    Lines: "alias PATTERN MODULE" (shell glob patterns request_module() may use),
    "needs MODULE DEP... MODULE" (its load order) and "node NAME c|b MAJOR MINOR" (device
    nodes whose opening makes the kernel ask for a module, like /dev/loop-control), for
    every module of the kernel that has one (as ``kmod static-nodes`` makes them on an
    ordinary system: /dev/mapper/control loads dm_mod from the build root on open).
    """
    lines = []
    for name, _ in plan.order:
        lines += [f"alias {pattern} {name}" for pattern in tree.request_aliases(name)]
    for name, _ in plan.order:
        lines.append(f"needs {name} {' '.join(plan.needs[name])}")
    nodes = dict(tree.devnames or {})
    for name, _ in plan.order:
        node = tree.devname(name)
        if node:
            nodes[name] = node
    for name in sorted(nodes):
        lines.append("node {} {} {} {}".format(*nodes[name]))
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- decompression


def zstd_decompress(data: bytes) -> bytes:
    """Decompress zstd with the zstd program: Python's stdlib has no zstd before 3.14."""
    from hshelper import runner

    return runner.pipe(["zstd", "-dcq"], data,
                       hint="install zstd (needed for .ko.zst kernel modules)")


SIGNATURE_MAGIC = b"~Module signature appended~\n"


def strip_signature(ko: bytes) -> bytes:
    """A module without its appended signature (unchanged when it has none).

    The kernel hashes a signed module before it loads it: under TCG that is a third of
    the load time of a large module (ext4: 0.48 s -> 0.31 s). The throwaway helper VM
    gains nothing from the check; a kernel that enforces signatures
    (CONFIG_MODULE_SIG_FORCE) keeps them. Layout: the module, the signature, a 12-byte
    ``struct module_signature`` ending in the big-endian signature length, the magic.
    """
    if not ko.endswith(SIGNATURE_MAGIC):
        return ko
    end = len(ko) - len(SIGNATURE_MAGIC)
    sig_len = int.from_bytes(ko[end - 4:end], "big")
    start = end - 12 - sig_len
    return ko[:start] if start > 0 else ko


def decompress_module(path: Path) -> bytes:
    """A module file's plain ELF bytes, whatever its compression."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        return zstd_decompress(data)
    return data


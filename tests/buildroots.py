"""Real build roots for the tests, made by mmdebstrap and cached between runs.

Each root is described by a Recipe (suite, packages, extra mirrors, a post-processing
step); its cache directory under /var/tmp/hshelper-test-roots is named by a hash of that
description, so changing a package list makes a new root and only the first run pays.
Roots are made in a temporary directory and renamed into place, under a lock, so an
interrupted run never leaves a half-made root that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("HSHELPER_TEST_ROOTS", "/var/tmp/hshelper-test-roots"))
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
BACKPORTS = f"deb {MIRROR} bookworm-backports main"
# Bumped when the way roots are made changes in a way the recipe does not show.
LAYOUT_VERSION = 3

# What hshelper itself needs in a build root (a packager would install the same).
HSHELPER_DEPS = ["python3", "python3-pluggy", "python3-sh", "python3-tenacity", "python3-toml"]
DISK_TOOLS = ["kmod", "fdisk", "gdisk", "dosfstools", "e2fsprogs", "util-linux", "mtools"]
QEMU = ["qemu-system-x86", "qemu-utils", "zstd"]
# What a foreign build root needs for hshelper's guest (unpacked, not installed).
FOREIGN = ["dash", "coreutils", "util-linux", "mount", "fdisk", "e2fsprogs", "dosfstools",
           "kmod", "zstd", "libc-bin"]
# What real image scripts call besides the disk tools (tests/test_scripts.py).
IMAGE_TOOLS = ["parted", "kpartx", "dmsetup", "lvm2", "cryptsetup-bin", "mdadm",
               "squashfs-tools", "xorriso", "grub-pc-bin", "grub2-common", "udev",
               "vmdb2", "zerofree"]


@dataclass(frozen=True)
class Recipe:
    packages: tuple[str, ...]
    extra_sources: tuple[str, ...] = ()
    derive: str = ""  # another root this one is made from (a layout change), not mmdebstrap
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def key(self, name: str) -> str:
        text = json.dumps([name, LAYOUT_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {
    # Debian 12 as a packager's build root: generic 6.1 kernel (plain .ko, 9p modules),
    # busybox, qemu and the disk tools. The root most tests run in.
    "bookworm": Recipe(tuple(["linux-image-amd64", "busybox", *HSHELPER_DEPS, *DISK_TOOLS,
                              *QEMU])),
    # The same without busybox: bash/dash, coreutils, util-linux, kmod supply the guest.
    "bookworm-nobusybox": Recipe(tuple(["linux-image-amd64", *HSHELPER_DEPS, *DISK_TOOLS])),
    # bookworm-backports' 6.12 kernel: modules are .ko.xz.
    "bookworm-612": Recipe(tuple(["linux-image-amd64/bookworm-backports", "busybox",
                                  *HSHELPER_DEPS, "kmod", "fdisk", "e2fsprogs"]),
                           extra_sources=(BACKPORTS,)),
    # The cloud kernel: no 9p at all.
    "bookworm-cloud": Recipe(tuple(["linux-image-cloud-amd64", "busybox", *HSHELPER_DEPS,
                                    "kmod", "fdisk", "e2fsprogs"])),
    # Fedora's layout, made from bookworm-612: kernel at /usr/lib/modules/V/vmlinuz, an
    # empty /boot, .ko.xz modules and no modules.dep (as if unpacked without depmod).
    "fedora-layout": Recipe((), derive="bookworm-612"),
    # hasher's view of the world, made from bookworm: /dev holds only null, zero and
    # urandom (and /proc is mounted only when asked for).
    "hasher-like": Recipe((), derive="bookworm"),
    # Not a build root: the system the image recipes (recipes/, issue 5) turn into a
    # bootable disk. The cloud kernel boots fastest under TCG; initramfs-tools makes the
    # initrd; the recipes install the bootloaders from it: systemd-boot's EFI binary,
    # GRUB's monolithic EFI image (removable path), extlinux and its MBR code (BIOS).
    "target-bookworm": Recipe(("linux-image-cloud-amd64", "initramfs-tools",
                               "systemd-boot-efi", "grub-efi-amd64-bin", "extlinux",
                               "syslinux-common")),
    # The bookworm build root plus xfsprogs and btrfs-progs: the recipes' --fs xfs|btrfs
    # (their mkfs, and the modules that come with it, enter the helper image).
    "bookworm-xfs-btrfs": Recipe(tuple(["linux-image-amd64", "busybox", *HSHELPER_DEPS,
                                        *DISK_TOOLS, *QEMU, "xfsprogs", "btrfs-progs"])),
    # Build roots of other architectures (issue 12), unpacked without running their
    # packages' scripts (--variant=extract: a minute each, where a full install through
    # qemu-user takes most of an hour): not usr-merged, no ld.so.conf, modules.dep made
    # by the host's depmod. The arm64 one has python3 and qemu-system-arm too, so that
    # hshelper runs inside it through qemu-user, as in an emulated arm64 build.
    "arm64": Recipe(tuple(["linux-image-arm64", "busybox", *FOREIGN, *HSHELPER_DEPS,
                           "qemu-system-arm"]), extra={"arch": "arm64"}),
    "ppc64el": Recipe(tuple(["linux-image-powerpc64le", "busybox", *FOREIGN]),
                      extra={"arch": "ppc64el"}),
    "s390x": Recipe(tuple(["linux-image-s390x", "busybox", *FOREIGN]),
                    extra={"arch": "s390x"}),
    # 32-bit roots (the table's i686 and armv7l rows).
    "i386": Recipe(tuple(["linux-image-686", "busybox", *FOREIGN]), extra={"arch": "i386"}),
    "armhf": Recipe(tuple(["linux-image-armmp-lpae", "busybox", *FOREIGN]),
                    extra={"arch": "armhf"}),
    # The arm64 system to put on a disk (issue 12's UEFI image), unpacked like the
    # build roots above; its initramfs made by its own mkinitramfs through qemu-user
    # (only the virtio, ext4 and vfat modules: seconds instead of minutes).
    "target-arm64": Recipe(("linux-image-arm64", "initramfs-tools", "busybox", "klibc-utils",
                            "systemd-boot-efi", "grep", "sed", "findutils", "gzip",
                            "diffutils", "debianutils", "cpio", "udev", "mawk", "bash",
                            *FOREIGN),
                           extra={"arch": "arm64", "initramfs": "virtio_pci virtio_blk ext4 "
                                  "vfat nls_cp437 nls_ascii"}),
    # Debian 13 has riscv64 as a release architecture (its packages are usr-merged).
    "riscv64": Recipe(tuple(["linux-image-riscv64", "busybox", *FOREIGN]),
                      extra={"arch": "riscv64", "suite": "trixie", "usrmerge": True}),
    # The bookworm build root plus the tools image scripts call (tests/scripts/): parted,
    # kpartx, LVM, cryptsetup, mdadm, squashfs, xorriso, GRUB for BIOS, udev's udevadm.
    # busybox stays installed: its applets must not shadow the GNU tools.
    "bookworm-imagetools": Recipe(tuple(["linux-image-amd64", "busybox", *HSHELPER_DEPS,
                                         *DISK_TOOLS, *QEMU, *IMAGE_TOOLS])),
}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def root_path(name: str) -> Path:
    return CACHE / f"{name}-{RECIPES[name].key(name)}"


DONE = ".hshelper-root-done"


def made_once(name: str, key: str, record, make: Callable[[Path], None]) -> Path:
    """CACHE/NAME-KEY, made by ``make(directory)`` when missing: under a lock (parallel
    runs wait for one maker), in a temporary directory renamed into place whole (an
    interrupted run never leaves a half-made root that looks finished), older keys of
    NAME removed; ``record`` (what it was made from) goes into its done-file."""
    target = CACHE / f"{name}-{key}"
    if (target / DONE).exists():
        return target
    with _locked(CACHE / f".{name}.lock"):
        if (target / DONE).exists():
            return target
        for stale in CACHE.glob(f"{name}-*"):  # older recipes of this root
            if stale != target and stale.name[len(name) + 1:].isalnum():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = CACHE / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            make(tmp)
            (tmp / DONE).write_text(json.dumps(record) + "\n")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_root(name: str) -> Path:
    """The cached root called ``name``, made first when missing."""
    recipe = RECIPES[name]
    source = ensure_root(recipe.derive) if recipe.derive else None

    def make(tmp: Path) -> None:
        if source is not None:
            # cp, not shutil.copytree: a root has device nodes (/dev/zero) that copytree
            # would read forever; -x stays out of a /proc a test mounted.
            subprocess.run(["cp", "-ax", str(source), str(tmp)], check=True)
            DERIVE[name](tmp)
        else:
            _mmdebstrap(recipe, tmp)

    return made_once(name, recipe.key(name), asdict(recipe), make)


def _foreign(recipe: Recipe, dest: Path) -> None:
    """A build root of another architecture, unpacked (see RECIPES), then given what
    its packages' scripts would have made (mmdebstrap runs no hooks for this variant):
    the merged-/usr links of a usr-merged suite, /bin/sh, the kernel's modules.dep
    (the host's depmod reads any architecture's modules), the build user's home."""
    argv = ["mmdebstrap", "--quiet", "--variant=extract", "--format=directory",
            f"--architectures={recipe.extra['arch']}",
            "--include=" + ",".join(recipe.packages),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            recipe.extra.get("suite", "bookworm"), str(dest), MIRROR]
    subprocess.run(argv, check=True)
    if recipe.extra.get("usrmerge"):
        for name in ("bin", "sbin", "lib"):
            if not (dest / name).exists():
                os.symlink(f"usr/{name}", dest / name)
    if not os.path.lexists(dest / "bin/sh"):
        os.symlink("dash", dest / "bin/sh")
    for base in ("lib/modules", "usr/lib/modules"):
        moddir = dest / base
        if moddir.is_dir() and not moddir.is_symlink():
            for version in os.listdir(moddir):
                subprocess.run(["depmod", "-b", str(dest), version], check=True)
    home = dest / "home/builder"
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, 65534, 65534)
    if recipe.extra.get("initramfs"):
        _foreign_initramfs(dest, recipe.extra["initramfs"].split())


def _foreign_initramfs(dest: Path, modules: list[str]) -> None:
    """The root's own mkinitramfs, run in it through qemu-user, for each kernel."""
    conf = dest / "etc/initramfs-tools"
    (conf / "modules").write_text("".join(f"{m}\n" for m in modules))
    text = (conf / "initramfs.conf").read_text()
    (conf / "initramfs.conf").write_text(
        "\n".join("MODULES=list" if line.startswith("MODULES=") else line
                  for line in text.splitlines()) + "\n")
    for name in ("proc", "tmp", "var/tmp"):
        (dest / name).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(dest / "proc")], check=True)
    try:
        for version in os.listdir(dest / "lib/modules"):
            subprocess.run(["chroot", str(dest), "mkinitramfs", "-o",
                            f"/boot/initrd.img-{version}", version], check=True)
            os.symlink(f"boot/vmlinuz-{version}", dest / "vmlinuz")
            os.symlink(f"boot/initrd.img-{version}", dest / "initrd.img")
    finally:
        subprocess.run(["umount", str(dest / "proc")], check=False)


def _mmdebstrap(recipe: Recipe, dest: Path) -> None:
    if recipe.extra.get("arch"):
        _foreign(recipe, dest)
        return
    argv = ["mmdebstrap", "--quiet", "--variant=minbase", "--format=directory",
            "--include=" + ",".join(recipe.packages),
            # No docs or translations: smaller roots, faster copies.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            # A build user's home, owned by the build user (65534, as hasher's is not root).
            "--customize-hook=mkdir -p \"$1/home/builder\" && "
            "chown 65534:65534 \"$1/home/builder\"",
            "bookworm", str(dest), MIRROR, f"deb {SECURITY} bookworm-security main",
            *recipe.extra_sources]
    subprocess.run(argv, check=True)


def _hasher_dev(root: Path) -> None:
    for entry in (root / "dev").iterdir():
        if entry.name not in ("null", "zero", "urandom"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _fedora_layout(root: Path) -> None:
    moddirs = sorted((root / "usr/lib/modules").iterdir())
    for moddir in moddirs:
        version = moddir.name
        for boot_name, fedora_name in (("vmlinuz", "vmlinuz"), ("config", "config"),
                                       ("System.map", "System.map")):
            boot_file = root / "boot" / f"{boot_name}-{version}"
            if boot_file.exists():
                os.rename(boot_file, moddir / fedora_name)
        for dep in moddir.glob("modules.*"):
            if dep.name not in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
                dep.unlink()
    for entry in (root / "boot").iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


DERIVE = {"fedora-layout": _fedora_layout, "hasher-like": _hasher_dev}


# ------------------------------------------------------------------ apt-installed packages

# What the .debs pull is installed the way a buildd installs build dependencies: Depends
# only. helper-run must work with those alone (sbuild and pbuilder install no
# Recommends either).
APT_INSTALL = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
APT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C.UTF-8", "HOME": "/root"}


def _deb_relations(deb: Path) -> list[str]:
    fields = ("Package", "Pre-Depends", "Depends", "Recommends", "Provides")
    out = subprocess.run(["dpkg-deb", "-f", str(deb), *fields], capture_output=True,
                         text=True, check=True).stdout
    return sorted(out.splitlines())


def apt_root(debs: list[Path]) -> Path:
    """A clean bookworm (mmdebstrap minbase, apt's lists kept) in which ``apt-get install
    ./DEB...`` pulled the packages' dependencies from the archive, after which the
    packages themselves were purged: Debian plus exactly what their dependencies
    brought. Cached under a key of how it is made and of the packages' relation
    fields, so a change to debian/control makes it again from scratch (and proves the
    pull again); a run installs the packages of the checkout on top (apt_overlay)."""
    recipe = ["bookworm-apt", LAYOUT_VERSION, MIRROR, SECURITY, APT_INSTALL,
              [_deb_relations(deb) for deb in sorted(debs)]]

    def make(tmp: Path) -> None:
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                        "--format=directory", "--skip=cleanup/apt/lists",
                        "bookworm", str(tmp), MIRROR,
                        f"deb {SECURITY} bookworm-security main"], check=True)
        _apt_install(tmp, debs)
        names = [_deb_field(deb, "Package") for deb in debs]
        _in_root(tmp, ["apt-get", "purge", "-y", "-q", *names])
        _in_root(tmp, ["apt-get", "clean"])

    return made_once("bookworm-apt", _key(recipe), recipe, make)


def _key(recipe) -> str:
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


def _in_root(root: Path, argv: list[str], cwd: str = "/") -> subprocess.CompletedProcess:
    """``argv`` as root in ``root`` with /proc mounted, apt's environment; raises with
    the output when it fails."""
    (root / "proc").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        proc = subprocess.run(["chroot", str(root), "/usr/bin/env", "-i",
                               *[f"{k}={v}" for k, v in APT_ENV.items()],
                               "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv],
                              capture_output=True, text=True, timeout=1800)
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
    if proc.returncode:
        raise RuntimeError(f"{argv} in {root} exited {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _apt_install(root: Path, debs: list[Path]) -> subprocess.CompletedProcess:
    """``apt-get install ./NAME.deb...`` in ``root``, the files copied to /tmp/debs."""
    where = root / "tmp/debs"
    where.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.copy(deb, where)
    try:
        return _in_root(root, [*APT_INSTALL, *[f"./{deb.name}" for deb in debs]],
                        cwd="/tmp/debs")
    finally:
        shutil.rmtree(where, ignore_errors=True)


@contextlib.contextmanager
def apt_overlay(debs: list[Path], lower: Path | None = None):
    """``lower`` (default: the apt root, apt_root) under a private overlay, with
    ``apt-get install ./NAME.deb...`` of ``debs`` done in it; yields (root, apt's
    output)."""
    with overlay(lower or apt_root(debs)) as merged:
        yield merged, _apt_install(merged, debs)


def deb_dependencies(debs: list[Path]) -> list[str]:
    """The archive packages ``debs`` depend on: the first of each set of alternatives,
    without versions or architecture qualifiers, the debs themselves left out."""
    own = {_deb_field(deb, "Package") for deb in debs}
    names = set()
    for deb in debs:
        for relation in _deb_field(deb, "Depends").split(","):
            name = relation.split("|")[0].split("(")[0].strip().split(":")[0]
            if name and name not in own:
                names.add(name)
    return sorted(names)


# The build tools the integration tests run in the apt root: pbuilder (with iproute2,
# its loopback in the build's network namespace, and dpkg-dev: dpkg-source and
# dpkg-scanpackages), and rpm (rpm, rpmbuild) for the mock and hasher examples, whose
# image step installs RPMs with rpm --root.
TOOLS = ["pbuilder", "debootstrap", "iproute2", "dpkg-dev", "rpm"]


def tools_root(debs: list[Path]) -> Path:
    """The apt root (apt_root) with TOOLS installed and pbuilder's base tarball made
    once by ``pbuilder create`` at its default place (/var/cache/pbuilder/base.tgz,
    uncompressed: extracting it is then cheap), holding what the .debs depend on, so
    that a build's Build-Depends: hshelper needs nothing from the network. Cached under
    a key of the apt root, TOOLS and those dependencies."""
    lower = apt_root(debs)
    recipe = ["bookworm-tools", lower.name, TOOLS, deb_dependencies(debs), MIRROR, SECURITY]

    def make(tmp: Path) -> None:
        subprocess.run(["cp", "-ax", str(lower), str(tmp)], check=True)
        _in_root(tmp, [*APT_INSTALL, *TOOLS])
        _in_root(tmp, ["pbuilder", "create", "--distribution", "bookworm",
                       "--mirror", MIRROR,
                       "--othermirror", f"deb {SECURITY} bookworm-security main",
                       "--compressprog", "cat", "--aptcache", "",
                       "--extrapackages", " ".join(deb_dependencies(debs))])
        _in_root(tmp, ["apt-get", "clean"])

    return made_once("bookworm-tools", _key(recipe), recipe, make)


@contextlib.contextmanager
def overlay(lower: Path):
    """``lower`` under a private, writable overlay for the duration; yields the merged
    root. ``lower`` never changes; the overlay goes afterwards."""
    top = Path(tempfile.mkdtemp(prefix="hshelper-overlay.", dir=CACHE))
    merged, upper, work = top / "root", top / "upper", top / "work"
    for path in (merged, upper, work):
        path.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-R", "-l", str(merged)], check=False)
        shutil.rmtree(top, ignore_errors=True)


def ensure_all(parallel: int = 4) -> None:
    """Every root of RECIPES, made side by side where missing (mmdebstrap waits on the
    network and the disk more than on the processors): a fresh machine's first test run
    then pays for the slowest root, not for all of them in turn."""
    from concurrent.futures import ThreadPoolExecutor

    missing = [name for name in RECIPES if not (root_path(name) / DONE).exists()]
    if not missing:
        return
    print(f"buildroots: making {', '.join(missing)} (cached in {CACHE})", flush=True)
    with ThreadPoolExecutor(parallel) as pool:
        for name, path in zip(missing, pool.map(ensure_root, missing)):
            print(f"buildroots: {name}: {path}", flush=True)


if __name__ == "__main__":
    ensure_all()

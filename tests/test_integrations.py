"""The build-system integrations in integrations/.

mock: the plugin is driven by stand-ins that follow mock's documented plugin API
(``requires_api_version``, ``init(plugins, conf, buildroot)``, ``plugins.add_hook``,
hooks called by stage name, ``postbuild`` called after failed builds too, the
``*_opts`` dicts with mock's injected keys) — mock itself is not installed here. The
command the plugin issues runs for real: helper-run, in a real build root, as the build
user, booting a real VM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import buildroots
import chroot
import packages
import pytest

SRC = Path(__file__).resolve().parent.parent
MOCK_PLUGIN_DIR = SRC / "integrations/mock"
BUILDER = chroot.BUILD_UID
RESULT_OWNER = 4242  # mock's caller: not the build user, not root


# ------------------------------------------------------------------ mock API stand-ins


class StandInMockError(Exception):
    """Stand-in for mockbuild.exception.Error (what a failed doChroot raises)."""


class MockPluginsStandIn:
    """Stand-in for mockbuild.plugin.Plugins: plugins listed in config['plugins'] and
    enabled by plugin_conf['<name>_enable'] are loaded from plugin_dir, must declare
    requires_api_version "1.1", and get init(plugins, plugin_conf['<name>_opts'],
    buildroot) with mock's keys (resultdir, root, ...) added to every *_opts dict;
    add_hook(stage, fn) registers, call_hooks(stage) calls in order."""

    API = "1.1"

    def __init__(self, config: dict):
        self.config = config
        self.hooks: dict[str, list] = {}

    def init_plugins(self, buildroot) -> None:
        for key, conf in self.config["plugin_conf"].items():
            if key.endswith("_opts"):
                conf.update(basedir="/var/lib/mock", root="standin", resultdir=buildroot.resultdir,
                            cachedir="/var/cache/mock/standin", cache_topdir="/var/cache/mock")
        for name in self.config["plugins"]:
            if not self.config["plugin_conf"].get(f"{name}_enable"):
                continue
            path = Path(self.config["plugin_dir"]) / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"standin_mock_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if getattr(module, "requires_api_version", None) != self.API:
                raise StandInMockError(f"plugin {name}: API version mismatch")
            module.init(self, self.config["plugin_conf"][f"{name}_opts"], buildroot)

    def add_hook(self, stage, function):
        if function not in self.hooks.setdefault(stage, []):
            self.hooks[stage].append(function)

    def call_hooks(self, stage, *args, **kwargs):
        for hook in self.hooks.get(stage, []):
            hook(*args, **kwargs)


@dataclass
class BindMountPointStandIn:
    """Stand-in for mockbuild.mounts.BindMountPoint(srcpath, bindpath)."""

    srcpath: str
    bindpath: str


@dataclass
class MockMountsStandIn:
    """Stand-in for buildroot.mounts: add_user_mount records what mock would mount."""

    user_mounts: list = field(default_factory=list)

    def add_user_mount(self, mount):
        self.user_mounts.append(mount)


@dataclass
class MockStateStandIn:
    result: str | None = None  # mock's backend sets "success" or "fail" before postbuild


class MockBuildrootStandIn:
    """Stand-in for mockbuild.buildroot.Buildroot, the parts plugins use: config, state,
    resultdir, homedir, builddir, chrootuid/gid/user, env, mounts, make_chroot_path and
    doChroot — the last runs the command for real in ``rootdir`` as uid:gid (chroot(8),
    as mock's simple isolation does)."""

    def __init__(self, rootdir: Path, resultdir: Path, config: dict):
        self.rootdir = rootdir
        self.resultdir = str(resultdir)
        self.config = config
        self.state = MockStateStandIn()
        self.mounts = MockMountsStandIn()
        self.homedir = "/builddir"
        self.builddir = "/builddir/build"
        self.chrootuid = self.chrootgid = BUILDER
        self.chrootuser = "mockbuild"
        self.env = {"HOME": "/builddir", "PATH": "/usr/local/bin:/usr/bin:/bin",
                    "LANG": "C.UTF-8", "SHELL": "/bin/bash", "TERM": "vt100"}
        self.calls: list[dict] = []

    def make_chroot_path(self, *paths: str) -> str:
        return os.path.join(str(self.rootdir), *[p.lstrip("/") for p in paths])

    def doChroot(self, command, shell=True, returnOutput=False, printOutput=False,
                 raiseExc=True, uid=None, gid=None, user=None, cwd=None, env=None,
                 nspawn_args=None, **kwargs):
        self.calls.append({"command": command, "uid": uid, "gid": gid, "cwd": cwd,
                           "env": env, "nspawn_args": nspawn_args})
        argv = ["/bin/sh", "-c", command] if shell else list(command)
        env_words = [f"{k}={v}" for k, v in (env or self.env).items()]
        proc = subprocess.run(
            ["chroot", f"--userspec={uid or 0}:{gid or 0}", str(self.rootdir),
             "/usr/bin/env", "-i", *env_words, "/bin/sh", "-c", 'cd "$0" && exec "$@"',
             cwd or "/", *argv], capture_output=True, timeout=600)
        self.last = proc
        if proc.returncode and raiseExc:
            raise StandInMockError(f"command failed: {proc.returncode}: {proc.stderr[-400:]}")
        return proc.stdout.decode() if returnOutput else None


def mock_config(opts: dict, isolation: str = "simple") -> dict:
    return {"plugins": ["bind_mount", "hshelper"], "plugin_dir": str(MOCK_PLUGIN_DIR),
            "isolation": isolation, "nspawn_args": [],
            "plugin_conf": {"bind_mount_enable": False, "bind_mount_opts": {"dirs": []},
                            "hshelper_enable": True, "hshelper_opts": opts}}


@pytest.fixture
def mockbuild_mounts(monkeypatch):
    """mockbuild.mounts as the plugin imports it inside mock (only when binding kvm)."""
    package = types.ModuleType("mockbuild")
    mounts = types.ModuleType("mockbuild.mounts")
    mounts.BindMountPoint = BindMountPointStandIn
    monkeypatch.setitem(sys.modules, "mockbuild", package)
    monkeypatch.setitem(sys.modules, "mockbuild.mounts", mounts)


def load_plugin():
    spec = importlib.util.spec_from_file_location("hshelper_mock_plugin",
                                                  MOCK_PLUGIN_DIR / "hshelper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ mock: no VM


def test_mock_plugin_imports_without_mock():
    path = str(MOCK_PLUGIN_DIR / "hshelper.py")
    code = ("import importlib.util, sys\n"
            f"s = importlib.util.spec_from_file_location('hshelper', {path!r})\n"
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
            "assert m.requires_api_version == '1.1' and callable(m.init)\n"
            "assert not [n for n in sys.modules if n.startswith('mockbuild')]\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert proc.stdout == "ok\n", proc.stderr


def test_mock_kvm_setup_per_isolation():
    plugin = load_plugin()
    assert plugin.kvm_setup("simple", True) == (True, [])
    assert plugin.kvm_setup("nspawn", True) == (True, plugin.NSPAWN_KVM_ARGS)
    assert plugin.kvm_setup("auto", False) == (False, [])
    assert plugin.step_argv("helper-run true") == ["/bin/sh", "-c", "helper-run true"]
    assert plugin.step_argv(["helper-run", "true"]) == ["helper-run", "true"]


@pytest.mark.parametrize("isolation", ["simple", "nspawn"])
def test_mock_init_gives_the_chroot_dev_kvm(tmp_path, mockbuild_mounts, isolation):
    config = mock_config({"command": "helper-run true"}, isolation)
    buildroot = MockBuildrootStandIn(tmp_path / "root", tmp_path, config)
    plugins = MockPluginsStandIn(config)
    plugins.init_plugins(buildroot)
    assert "postbuild" in plugins.hooks
    if not os.path.exists("/dev/kvm"):
        assert buildroot.mounts.user_mounts == [] and config["nspawn_args"] == []
        return
    [mount] = buildroot.mounts.user_mounts
    assert mount == BindMountPointStandIn("/dev/kvm", str(tmp_path / "root/dev/kvm"))
    plugins.call_hooks("postinit")
    assert (tmp_path / "root/dev/kvm").exists()  # the mount point
    expected = [] if isolation == "simple" else ["--bind=/dev/kvm",
                                                 "--property=DeviceAllow=/dev/kvm rw"]
    assert config["nspawn_args"] == expected


def test_mock_plugin_without_a_command_does_nothing(tmp_path, mockbuild_mounts):
    config = mock_config({})
    plugins = MockPluginsStandIn(config)
    plugins.init_plugins(MockBuildrootStandIn(tmp_path, tmp_path, config))
    assert plugins.hooks == {}


def test_mock_collect_never_follows_symlinks(tmp_path):
    plugin = load_plugin()
    work, result = tmp_path / "work", tmp_path / "result"
    work.mkdir()
    result.mkdir()
    (work / "disk.img").write_bytes(b"img")
    (work / "leak").symlink_to("/etc/hostname")
    copied = plugin.collect(str(work), ["*"], str(result), (os.getuid(), os.getgid()))
    assert copied == ["disk.img"] and sorted(os.listdir(result)) == ["disk.img"]


# ------------------------------------------------------------------ mock: real runs


@pytest.fixture
def mock_root(bookworm):
    """The bookworm root as mock prepares one: /proc mounted, /builddir owned by the
    build user, a built RPM in /builddir/build/RPMS."""
    home = bookworm / "builddir"
    (home / "build/RPMS/x86_64").mkdir(parents=True, exist_ok=True)
    for path in (home, home / "build"):
        os.chown(path, BUILDER, BUILDER)
    (home / "build/RPMS/x86_64/demo-1.0-1.x86_64.rpm").write_bytes(b"built by the test")
    try:
        with chroot.proc_mounted(bookworm):
            yield bookworm
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def resultdir(tmp_path):
    result = tmp_path / "result"
    result.mkdir()
    os.chown(result, RESULT_OWNER, RESULT_OWNER)
    return result


STEP = ("helper-run --disk disk.img,size=64M,name=out sh -c "
        "'mkfs.ext4 -q -L mockimg $HSHELPER_DISK_OUT && id -u > guest-uid.txt && "
        "echo \"$HSHELPER_RPMS\" > rpms.txt'")


@pytest.mark.slow
@pytest.mark.vm
def test_mock_postbuild_runs_the_step_as_the_build_user(mock_root, resultdir,
                                                        mockbuild_mounts):
    config = mock_config({"command": STEP, "artifacts": ["disk.img", "*.txt"]})
    buildroot = MockBuildrootStandIn(mock_root, resultdir, config)
    plugins = MockPluginsStandIn(config)
    plugins.init_plugins(buildroot)
    buildroot.state.result = "success"
    plugins.call_hooks("postbuild")
    assert buildroot.last.returncode == 0, buildroot.last.stderr.decode()
    [call] = buildroot.calls
    assert (call["uid"], call["gid"], call["cwd"]) == (BUILDER, BUILDER, "/builddir/hshelper")
    names = sorted(os.listdir(resultdir))
    assert names == ["disk.img", "guest-uid.txt", "hshelper-report.json", "rpms.txt"]
    assert (resultdir / "guest-uid.txt").read_text() == "0\n"  # root in the VM
    assert (resultdir / "rpms.txt").read_text() == \
        "/builddir/build/RPMS/x86_64/demo-1.0-1.x86_64.rpm\n"
    for name in names:
        assert (resultdir / name).stat().st_uid == RESULT_OWNER
    workdir = mock_root / "builddir/hshelper"
    assert (workdir / "disk.img").stat().st_uid == BUILDER  # made by the build user
    disk = (resultdir / "disk.img").read_bytes()
    assert disk[1024 + 56:1024 + 58] == b"\x53\xef"  # ext4 superblock magic
    report = json.loads((resultdir / "hshelper-report.json").read_text())
    assert report["status"] == 0
    [art] = report["artifacts"]
    assert art["path"] == "disk.img" and art["sha256"] == hashlib.sha256(disk).hexdigest()


@pytest.mark.slow
def test_mock_postbuild_after_a_failed_build_runs_nothing(mock_root, resultdir,
                                                          mockbuild_mounts):
    config = mock_config({"command": STEP})
    buildroot = MockBuildrootStandIn(mock_root, resultdir, config)
    plugins = MockPluginsStandIn(config)
    plugins.init_plugins(buildroot)
    buildroot.state.result = "fail"
    plugins.call_hooks("postbuild")
    assert buildroot.calls == [] and os.listdir(resultdir) == []


@pytest.mark.slow
@pytest.mark.vm
def test_mock_failing_step_fails_the_hook_and_keeps_its_report(mock_root, resultdir,
                                                               mockbuild_mounts):
    config = mock_config({"command": ["helper-run", "sh", "-c", "echo partial > p.txt; exit 3"]})
    buildroot = MockBuildrootStandIn(mock_root, resultdir, config)
    plugins = MockPluginsStandIn(config)
    plugins.init_plugins(buildroot)
    buildroot.state.result = "success"
    with pytest.raises(StandInMockError):
        plugins.call_hooks("postbuild")
    assert buildroot.last.returncode == 3
    assert (resultdir / "p.txt").read_text() == "partial\n"
    assert json.loads((resultdir / "hshelper-report.json").read_text())["status"] == 3


# ------------------------------------------------------------------ RPM spec (hasher, Fedora)

SPEC = SRC / "packaging/hshelper.spec"


def rpm_query(path: Path, *what: str) -> list[str]:
    out = subprocess.run(["rpm", "-qp", *what, str(path)], capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("vendor", ["", "alt"])
def test_rpm_spec_builds_with_rpmbuild(tmp_path, vendor):
    if not shutil.which("rpmbuild"):
        pytest.skip("rpmbuild is not installed (Debian package rpm)")
    # Source0 as the README says to make it (scripts/release-tarball).
    packages.release_tarball(tmp_path / "SOURCES")
    defines = ["--define", f"_topdir {tmp_path}"] + (
        ["--define", f"_vendor {vendor}"] if vendor else [])
    parsed = subprocess.run(["rpmspec", "-P", *defines, str(SPEC)], capture_output=True,
                            text=True)
    assert parsed.returncode == 0 and "Name: hshelper" in parsed.stdout, parsed.stderr
    # --nodeps: Debian's rpm has no database of the build requirements.
    build = subprocess.run(["rpmbuild", "-ba", "--nodeps", *defines, str(SPEC)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    rpms = {p.name.split("-0.1.0")[0]: p for p in (tmp_path / "RPMS").rglob("*.rpm")}
    assert sorted(rpms) == ["hshelper", "hshelper-mock", "hshelper-run"]
    assert list((tmp_path / "SRPMS").glob("hshelper-0.1.0-1.src.rpm"))
    files = rpm_query(rpms["hshelper"], "-l")
    assert [f for f in rpm_query(rpms["hshelper"], "-L") if f.endswith("/LICENSE")]
    assert "/usr/bin/helper-run" in files
    assert any(f.endswith("/hshelper/plugins/vmrun.py") for f in files)
    assert any(f.endswith("/integrations/common/hshelper-after-build") for f in files)
    assert any(f.endswith("/mockbuild/plugins/hshelper.py")
               for f in rpm_query(rpms["hshelper-mock"], "-l"))
    requires = rpm_query(rpms["hshelper-run"], "--requires")
    assert "/proc" in requires and "qemu-system-x86-core" in requires
    if vendor == "alt":  # hasher mounts /dev/kvm when a package requires it
        assert "/dev/kvm" in requires and "kernel" in requires
        assert "/usr/lib/rpm/hshelper-kernel.filetrigger" in rpm_query(rpms["hshelper-run"],
                                                                       "-l")
    else:
        assert "/dev/kvm" not in requires and "kernel-core" in requires
        triggers = "\n".join(rpm_query(rpms["hshelper-run"], "--filetriggers"))
        assert "/lib/modules" in triggers and "hshelper-kernel.filetrigger" in triggers


def test_image_spec_example_parses():
    if not shutil.which("rpmspec"):
        pytest.skip("rpmspec is not installed (Debian package rpm)")
    spec = SRC / "integrations/hasher/image.spec.example"
    proc = subprocess.run(["rpmspec", "-q", "--buildrequires", str(spec)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hshelper-run"]


@pytest.mark.slow
def test_kernel_file_trigger_makes_modules_readable_and_runs_depmod(bookworm, tmp_path):
    """The trigger script for real, on a module tree and kernel made unreadable (as ALT
    installs them) and without modules.dep. It runs in the build root (its sh and depmod)
    in a private mount namespace where /lib/modules and /boot are scratch trees, so
    nothing shared changes."""
    version = sorted(p.name for p in (bookworm / "lib/modules").iterdir())[0]
    fake = "0.0.0-hshelper-trigger-test"
    tree = tmp_path / "modules" / fake
    (tree / "kernel/fs").mkdir(parents=True)
    shutil.copytree(bookworm / "lib/modules" / version / "kernel/fs/isofs",
                    tree / "kernel/fs/isofs")
    (tmp_path / "boot").mkdir()
    vmlinuz = tmp_path / "boot" / f"vmlinuz-{fake}"
    shutil.copy(bookworm / "boot" / f"vmlinuz-{version}", vmlinuz)
    module = next((tree / "kernel/fs/isofs").iterdir())
    for path in (module, vmlinuz):
        path.chmod(0o600)
    (tree / "kernel").chmod(0o700)
    trigger = SRC / "integrations/hasher/hshelper-kernel.filetrigger"
    paths = [f"/boot/vmlinuz-{fake}", f"/lib/modules/{fake}/kernel/fs/isofs/{module.name}"]
    shutil.copy(trigger, tmp_path / "modules/.trigger")
    # The build root's own sh and depmod, with scratch trees over its /lib/modules, /boot.
    script = (f"mount --bind {tmp_path}/modules {bookworm}/lib/modules && "
              f"mount --bind {tmp_path}/boot {bookworm}/boot && "
              f"exec chroot {bookworm} /bin/sh /lib/modules/.trigger")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          input="\n".join(paths) + "\n", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert module.stat().st_mode & 0o444 == 0o444
    assert vmlinuz.stat().st_mode & 0o444 == 0o444
    assert (tree / "kernel").stat().st_mode & 0o555 == 0o555
    assert f"kernel/fs/isofs/{module.name}:" in (tree / "modules.dep").read_text()


# ------------------------------------------------------------------ sbuild (Debian)

SBUILD_USER = "hshbuild"  # unprivileged, with subuid/subgid ranges (unshare mode)
# fakeroot: sbuild 0.85 adds it to every build's dependencies (no apt lists needed).
SBUILD_PACKAGES = ("fakeroot", "linux-image-amd64", "busybox", *buildroots.HSHELPER_DEPS,
                   *buildroots.DISK_TOOLS, *buildroots.QEMU)


def sbuild_tarball() -> Path:
    """An sbuild unshare chroot (mmdebstrap, buildd variant) with hshelper's
    dependencies, a kernel, qemu and the disk tools; cached in the test-roots cache,
    named by a hash of how it is made, so only the first run pays."""
    recipe = ["bookworm", "buildd", sorted(SBUILD_PACKAGES), buildroots.MIRROR, 1]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    target = buildroots.CACHE / f"sbuild-bookworm-{key}.tar"
    if target.exists():
        return target
    with buildroots._locked(buildroots.CACHE / ".sbuild-bookworm.lock"):
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=buildd", "--format=tar",
                 "--skip=output/dev", "--include=" + ",".join(SBUILD_PACKAGES),
                 "--dpkgopt=path-exclude=/usr/share/doc/*",
                 "--dpkgopt=path-exclude=/usr/share/man/*",
                 "--dpkgopt=path-exclude=/usr/share/locale/*",
                 "bookworm", str(tmp), buildroots.MIRROR,
                 f"deb {buildroots.SECURITY} bookworm-security main"], check=True)
            tmp.chmod(0o644)
            os.rename(tmp, target)
    return target


DEMO_FILES = {
    "debian/control": (
        "Source: hsh-demo\nSection: misc\nPriority: optional\nMaintainer: Test <t@localhost>\n"
        "Standards-Version: 4.6.2\nRules-Requires-Root: no\n\n"
        "Package: hsh-demo\nArchitecture: all\nDescription: hshelper sbuild test\n"
        " A file, put on a disk image after the build.\n"),
    "debian/changelog": (
        "hsh-demo (1.0) unstable; urgency=medium\n\n  * Test.\n\n"
        " -- Test <t@localhost>  Thu, 26 Nov 2026 00:00:00 +0000\n"),
    "debian/source/format": "3.0 (native)\n",
    # No debhelper: the chroot needs nothing beyond build-essential (no network).
    "debian/rules": (
        "#!/usr/bin/make -f\n"
        "build build-arch build-indep binary-arch:\n"
        "binary binary-indep:\n"
        "\tinstall -d debian/tmp/DEBIAN debian/tmp/usr/share/hsh-demo\n"
        "\techo 'made by sbuild' > debian/tmp/usr/share/hsh-demo/hello\n"
        "\tdpkg-gencontrol -phsh-demo -Pdebian/tmp\n"
        "\tdpkg-deb --root-owner-group --build debian/tmp ..\n"
        "clean:\n\trm -rf debian/tmp debian/files\n"),
}
# The image step (runs as the build user; helper-run makes it root in the VM): a GPT disk
# with an ext4 partition holding the contents of the package sbuild just built.
DEMO_STEP = """#!/bin/sh
set -e
dev=$HSHELPER_DISK_OUT
printf 'label: gpt\\n,,L\\n' | sfdisk -q "$dev"
mkfs.ext4 -q -L hshdemo "${dev}1"
mkdir -p /tmp/r && mount "${dev}1" /tmp/r
for deb in $HSHELPER_PACKAGES; do dpkg-deb -x "$deb" /tmp/r; done
umount /tmp/r
"""


def stage_hshelper(stage: Path) -> None:
    """This checkout laid out as chroot.install lays it out (opt/hshelper, wrappers in
    usr/local/bin), in a tree a chroot-setup command copies into sbuild's chroot."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target = stage / "opt/hshelper/hshelper"
    shutil.copytree(SRC / "hshelper", target, ignore=ignore)
    shutil.copytree(SRC / "plugins", target / "plugins", ignore=ignore)
    shutil.copytree(SRC / "recipes", target / "recipes", ignore=ignore)
    for name, func in (("hshelper", "main"), ("helper-run", "helper_run_main")):
        wrapper = stage / "usr/local/bin" / name
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(chroot.WRAPPER.format(func=func))
        wrapper.chmod(0o755)


def sbuild_workspace(tarball: Path) -> Path:
    """A directory the unprivileged sbuild user owns: the source package, a staging tree
    with this checkout's hshelper (copied into the chroot by a chroot-setup command), the
    output directory bound into the chroot, and the sbuild config."""
    ws = Path(subprocess.run(["mktemp", "-d", "/var/tmp/hshelper-sbuild-test.XXXXXX"],
                             capture_output=True, text=True, check=True).stdout.strip())
    src = ws / "hsh-demo-1.0"
    for name, text in DEMO_FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "debian/rules").chmod(0o755)
    stage = ws / "stage"
    stage_hshelper(stage)
    shutil.copytree(SRC / "integrations", stage / "usr/share/hshelper/integrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (stage / "usr/local/bin/hsh-demo-image").write_text(DEMO_STEP)
    (stage / "usr/local/bin/hsh-demo-image").chmod(0o755)
    (ws / "out").mkdir()
    (ws / "build").mkdir()
    (ws / "sbuildrc").write_text(
        f"$unshare_bind_mounts = [\n"
        f"  {{ directory => '/dev', mountpoint => '/run/hshelper-host-dev' }},\n"
        f"  {{ directory => '{ws}/out', mountpoint => '/hshelper-out' }},\n"
        f"  {{ directory => '{stage}', mountpoint => '/hshelper-stage' }},\n];\n1;\n")
    subprocess.run(["chown", "-R", f"{SBUILD_USER}:{SBUILD_USER}", str(ws)], check=True)
    # sbuild's user namespace maps only the subordinate ids (root inside is the first
    # subuid): the bind-mounted directories must be open to "others", and the output
    # directory writable by them.
    ws.chmod(0o755)
    (ws / "out").chmod(0o777)
    return ws


@pytest.mark.slow
@pytest.mark.vm
def test_sbuild_unshare_finished_build_makes_a_disk_image():
    """A real sbuild run (unshare mode, chroot tarball made by mmdebstrap) of a tiny
    package; its finished-build command runs helper-run as the build user, which puts
    the built package's files on a partitioned disk image that lands on the host."""
    for tool in ("sbuild", "mmdebstrap", "newuidmap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (packages sbuild, mmdebstrap, uidmap)")
    if subprocess.run(["id", SBUILD_USER], capture_output=True).returncode:
        pytest.skip(f"no user {SBUILD_USER} with /etc/subuid and /etc/subgid ranges")
    tarball = sbuild_tarball()
    ws = sbuild_workspace(tarball)
    try:
        as_user = ["runuser", "-u", SBUILD_USER, "--", "env", f"HOME=/home/{SBUILD_USER}",
                   f"SBUILD_CONFIG={ws}/sbuildrc"]
        dsc = subprocess.run([*as_user, "sh", "-c", f"cd {ws} && dpkg-source -b hsh-demo-1.0"],
                             capture_output=True, text=True)
        assert dsc.returncode == 0, dsc.stderr
        step = ("/usr/share/hshelper/integrations/common/hshelper-after-build --out "
                "/hshelper-out --artifacts '*.img' %SBUILD_BUILD_DIR -- helper-run --mode root "
                "--disk demo.img,size=64M,name=out hsh-demo-image")
        proc = subprocess.run(
            [*as_user, "sh", "-c", f'cd {ws}/build && exec "$@"', "sbuild",
             "sbuild", "--chroot-mode=unshare", f"--chroot={tarball}", "--dist=bookworm",
             "--arch-all", "--no-source", "--no-run-lintian", "--no-run-piuparts",
             "--no-run-autopkgtest", "--no-apt-update", "--no-apt-upgrade",
             "--no-apt-distupgrade", "--chroot-setup-commands=cp -a /hshelper-stage/. /",
             "--chroot-setup-commands=/usr/share/hshelper/integrations/sbuild/"
             "hshelper-chroot-setup", f"--finished-build-commands={step}",
             f"{ws}/hsh-demo_1.0.dsc"], capture_output=True, text=True, timeout=1200)
        logs = sorted((ws / "build").glob("*.build"))
        log = (logs[-1].read_text(errors="replace")[-5000:] if logs else proc.stdout[-6000:]) \
            + proc.stderr[-2000:]
        assert proc.returncode == 0, log
        assert list((ws / "build").glob("hsh-demo_1.0_all.deb")), log
        image = ws / "out/demo.img"
        # Copied by root inside sbuild's namespace: owned by the first subordinate uid.
        assert image.stat().st_uid == subuid_base(SBUILD_USER), log
        report = json.loads((ws / "out/hshelper-report.json").read_text())
        assert report["status"] == 0 and report["cwd"].endswith("/hshelper")
        [art] = report["artifacts"]
        assert art["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        dump = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True,
                              check=True).stdout
        assert "label: gpt" in dump
        start = int(dump.split("start=")[1].split(",")[0])
        size = int(dump.split("size=")[1].split(",")[0])
        part = ws / "part.ext4"
        subprocess.run(["dd", f"if={image}", f"of={part}", "bs=512", f"skip={start}",
                        f"count={size}", "status=none"], check=True)
        hello = subprocess.run(["debugfs", "-R", "cat /usr/share/hsh-demo/hello", str(part)],
                               capture_output=True, text=True).stdout
        assert hello == "made by sbuild\n"
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def subuid_base(name: str) -> int:
    for line in Path("/etc/subuid").read_text().splitlines():
        user, start, _ = line.split(":")
        if user == name:
            return int(start)
    raise AssertionError(f"no /etc/subuid range for {name}")


# ------------------------------------------------------------------ release example


@pytest.mark.slow
@pytest.mark.vm
def test_release_script_builds_a_matrix_with_sha256sums(bookworm):
    """integrations/release/build-images in the build root as the build user: 2
    filesystems x raw/qcow2, each checked against its report, SHA256SUMS verifiable."""
    work = chroot.fresh_dir(bookworm, "release")
    host = bookworm / work.lstrip("/")
    shutil.copy(SRC / "integrations/release/build-images", host / "build-images")
    with chroot.proc_mounted(bookworm):
        proc = chroot.run(bookworm, ["python3", "build-images", "--out", "rel",
                                     "--stamp", "v1.2.3"], cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rel = host / "rel"
    names = ["demo-ext4.img", "demo-ext4.qcow2", "demo-vfat.img", "demo-vfat.qcow2"]
    sums = (rel / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in sums] == names
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=rel, capture_output=True)
    assert check.returncode == 0, check.stdout
    release = json.loads((rel / "release.json").read_text())
    assert [i["name"] for i in release["images"]] == names
    for name in names:
        report = json.loads((rel / "reports" / f"{name}.json").read_text())
        assert report["status"] == 0
        data = (rel / name).read_bytes()
        assert data[:4] == b"QFI\xfb" if name.endswith("qcow2") else data[512:520] == b"EFI PART"
    raw = rel / "demo-ext4.img"
    dump = subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True, text=True,
                          check=True).stdout
    start = int(dump.split("start=")[1].split(",")[0])
    part = rel / "p1"
    subprocess.run(["dd", f"if={raw}", f"of={part}", "bs=512", f"skip={start}", "status=none"],
                   check=True)
    stamp = subprocess.run(["debugfs", "-R", "cat /release.txt", str(part)],
                           capture_output=True, text=True).stdout
    assert stamp == "v1.2.3\n"
    bad = chroot.run(bookworm, ["python3", "build-images", "--formats", "vmdk"], cwd=work)
    assert bad.returncode == 2 and b"unknown format vmdk" in bad.stderr


# ------------------------------------------------------------------ pbuilder B hook


@pytest.mark.slow
@pytest.mark.vm
def test_pbuilder_b_hook_runs_the_step_as_the_build_user(bookworm, tmp_path):
    """The B hook as pbuilder runs it after a build: as root inside the chroot, with
    BUILDDIR, BUILDUSERNAME and the step in the environment. (pbuilder itself is not
    run: sbuild above is the full proof; this runs the hook and the step for real.)"""
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: hook-demo\nVersion: 1\nArchitecture: all\n"
                                        "Maintainer: T <t@localhost>\nDescription: test\n")
    build = bookworm / "build"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    os.chown(build, BUILDER, BUILDER)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg),
                    str(build / "hook-demo_1_all.deb")], check=True, capture_output=True)
    hooks = bookworm / "tmp/hshelper-hooks"
    shutil.rmtree(hooks, ignore_errors=True)
    hooks.mkdir()
    for src in ("pbuilder/B90hshelper", "common/hshelper-after-build"):
        shutil.copy(SRC / "integrations" / src, hooks)
    step = ('helper-run --disk hook.img,size=32M,name=out sh -c '
            '\'mkfs.ext4 -q "$HSHELPER_DISK_OUT" && echo "$HSHELPER_PACKAGES" > pkgs.txt\'')
    env = {"BUILDDIR": "/build", "BUILDUSERNAME": "nobody", "HSHELPER_STEP": step,
           "HSHELPER_OUT": "/build/out", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        with chroot.proc_mounted(bookworm):
            proc = subprocess.run(["chroot", str(bookworm), "/usr/bin/env", "-i",
                                   *[f"{k}={v}" for k, v in env.items()],
                                   "/bin/sh", "/tmp/hshelper-hooks/B90hshelper"],
                                  capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        work, out = build / "hshelper", build / "out"
        assert (work / "hook.img").stat().st_uid == BUILDER  # made by the build user
        assert (out / "pkgs.txt").read_text() == "/build/hook-demo_1_all.deb\n"
        image = (out / "hook.img").read_bytes()
        assert image[1024 + 56:1024 + 58] == b"\x53\xef"
        report = json.loads((out / "hshelper-report.json").read_text())
        assert report["status"] == 0
        assert report["artifacts"][0]["sha256"] == hashlib.sha256(image).hexdigest()
        # Without a step the hook does nothing, successfully.
        quiet = subprocess.run(["/usr/sbin/chroot", str(bookworm), "/bin/sh",
                                "/tmp/hshelper-hooks/B90hshelper"], capture_output=True,
                               text=True, env={"PATH": "/usr/bin:/bin"})
        assert quiet.returncode == 0 and "nothing to do" in quiet.stdout
    finally:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(hooks, ignore_errors=True)

"""The build-system integrations in integrations/.

mock: the plugin is driven by stand-ins of mock's own code (tests/mock_standins.py:
Plugins, Buildroot.doChroot, util.do_with_status, the mounts, the bootstrap buildroot),
mock itself not being installable on Debian 12. What the plugin asks mock to do happens
for real: bind mounts into a real build root, the step run there as the build user
(helper-run booting a real VM).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import buildroots
import chroot
import imagecheck
import mock_standins
import packages
import pytest

SRC = Path(__file__).resolve().parent.parent
MOCK_PLUGIN_DIR = SRC / "integrations/mock"
BUILDER = chroot.BUILD_UID
RESULT_OWNER = 4242  # mock's caller: not the build user, not root


# ------------------------------------------------------------------ docs/integrations.md

DOC = SRC / "docs/integrations.md"


def doc_snippet(name: str) -> str:
    """The code block that follows ``<!-- snippet: NAME -->`` in docs/integrations.md:
    what the tests run is the text a reader pastes."""
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```[a-z]*\n(.*?\n)```",
                      DOC.read_text(), re.S)
    assert found, f"docs/integrations.md has no snippet {name}"
    return found.group(1)


# The system the per-tool examples put the built packages on and boot: the target root
# of the recipe tests (cloud kernel, initramfs-tools, systemd-boot), with /sbin/init a
# marker that shows the package inside the booted image, then powers off.
PACKAGE_MARKER_INIT = f"""#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
echo "{imagecheck.MARKER} root $(awk '$2 == "/" {{print $1, $3}}' /proc/mounts)"
echo "{imagecheck.MARKER} hello $(cat /usr/share/hsh-demo/hello 2>&1)"
echo "{imagecheck.MARKER} done"
echo o >/proc/sysrq-trigger
sleep 30
"""


@pytest.fixture(scope="session")
def image_base(tmp_path_factory) -> Path:
    """base.tar for the examples' image steps (plain tar, numeric owners)."""
    target = buildroots.ensure_root("target-bookworm")
    base = tmp_path_factory.mktemp("image-base") / "base.tar"
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--exclude=./.hshelper-root-done",
                    "-C", str(target), "-cf", str(base), "."], check=True)
    extra = tmp_path_factory.mktemp("image-base-init")
    # /sbin/init, through /sbin -> usr/sbin on a merged-/usr system.
    init = "usr/sbin/init" if (target / "sbin").is_symlink() else "sbin/init"
    (extra / init).parent.mkdir(parents=True)
    (extra / init).write_text(PACKAGE_MARKER_INIT)
    (extra / init).chmod(0o755)
    subprocess.run(["tar", "--numeric-owner", "--owner=0", "--group=0", "-rf", str(base),
                    "-C", str(extra), f"./{init}"], check=True)
    base.chmod(0o644)
    return base


def check_image_result(out: Path, tmp: Path, hello: str, boot: bool = False) -> dict:
    """What every example's step leaves in its result directory: image.img with
    SHA256SUMS and the run report agreeing on it, a GPT layout with a clean root, the
    package's file inside; with ``boot``, the image boots (OVMF) to the marker, which
    prints it (one example boots: the image is the same recipe's in all of them)."""
    image = out / "image.img"
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True,
                           text=True)
    assert check.returncode == 0 and check.stdout == "image.img: OK\n", check.stdout
    report = json.loads((out / "hshelper-report.json").read_text())
    assert report["status"] == 0
    [art] = [a for a in report["artifacts"] if a["path"] == "image.img"]
    digest = (out / "SHA256SUMS").read_text().split()[0]
    assert art["sha256"] == digest and art["size"] == image.stat().st_size
    layout = imagecheck.layout(image)
    assert layout.label == "gpt" and [p.name for p in layout.partitions] == ["esp", "root"]
    root = imagecheck.extract(image, layout.partitions[1], tmp / "root.ext4")
    fsck = imagecheck.fsck(root, "ext4")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert imagecheck.ext_cat(root, "/usr/share/hsh-demo/hello") == hello
    if not boot:
        return report
    console = imagecheck.boot(image, "uefi", tmp / "console.log")
    lines = imagecheck.marker_lines(console)
    assert f"{imagecheck.MARKER} hello {hello.strip()}" in lines, console[-3000:]
    assert lines[-1].endswith("done"), console[-3000:]
    return report


IMAGE_STEP = "/usr/share/hshelper/integrations/common/hshelper-image-from-packages"


def test_image_step_refuses_bad_input_in_one_line(tmp_path):
    """Bad input is one line on stderr and status 1 (2 for usage), before any VM."""
    (tmp_path / "base.tar").write_bytes(b"")
    (tmp_path / "x.txt").write_text("")
    (tmp_path / "a.deb").write_text("")
    (tmp_path / "b.rpm").write_text("")
    step = str(SRC / "integrations/common/hshelper-image-from-packages")
    cases = [([], 2, "usage:"),
             (["no-base.tar", "a.deb"], 1, "BASE no-base.tar does not exist"),
             (["base.tar"], 1, "no packages to install"),
             (["base.tar", "x.txt"], 1, "x.txt is neither a .deb nor an .rpm"),
             (["base.tar", "gone.deb"], 1, "package gone.deb does not exist"),
             (["base.tar", "a.deb", "b.rpm"], 1, "cannot install .deb and .rpm"),
             (["--name", "a/b", "base.tar", "a.deb"], 1, "--name must be a plain file name")]
    for argv, status, message in cases:
        proc = subprocess.run(["sh", step, *argv], cwd=tmp_path, capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == status and proc.stderr.count("\n") == 1, (argv, proc.stderr)
        assert message in proc.stderr, (argv, proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["a.deb", "b.rpm", "base.tar", "x.txt"]


@pytest.mark.slow
@pytest.mark.vm
def test_image_step_leaves_no_image_when_the_install_fails(root, image_base, tmp_path):
    """A package whose dependency the base system lacks: dpkg fails in the VM after the
    image was made; the step exits non-zero and leaves neither the image nor
    SHA256SUMS, only the failing run's report saying why."""
    work = chroot.fresh_dir(root, "image-step-fail")
    host = root / work.lstrip("/")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: needs-missing\nVersion: 1\nArchitecture: all\nMaintainer: T <t@localhost>\n"
        "Depends: hshelper-no-such-package\nDescription: test\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg),
                    str(host / "needs-missing_1_all.deb")], check=True, capture_output=True)
    os.link(image_base, host / "base.tar")
    subprocess.run(["chown", "-R", f"{BUILDER}:{BUILDER}", str(host)], check=True)
    with chroot.shm_mounted(root):
        proc = chroot.run(root, [IMAGE_STEP, "--size", "1G", "base.tar",
                                 "needs-missing_1_all.deb"], cwd=work, timeout=900)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err[-3000:]
    assert "dependency problems" in err and "no image was written" in err, err[-3000:]
    left = sorted(os.listdir(host))
    assert left == ["base.tar", "image.mkimage.json", "image.report.json",
                    "needs-missing_1_all.deb"], left
    assert json.loads((host / "image.report.json").read_text())["status"] == 1


# ------------------------------------------------------------------ mock: no VM


def load_plugin():
    spec = importlib.util.spec_from_file_location("hshelper_mock_plugin",
                                                  MOCK_PLUGIN_DIR / "hshelper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mock_plugin_imports_without_mock():
    path = str(MOCK_PLUGIN_DIR / "hshelper.py")
    code = ("import importlib.util, sys\n"
            f"s = importlib.util.spec_from_file_location('hshelper', {path!r})\n"
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
            "assert m.requires_api_version == '1.1' and callable(m.init)\n"
            "assert m.run_in_bootstrap is False\n"
            "assert not [n for n in sys.modules if n.startswith('mockbuild')]\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert proc.stdout == "ok\n", proc.stderr


def test_mock_kvm_is_off_unless_switched_on():
    plugin = load_plugin()
    nspawn_kvm = ("--bind=/dev/kvm", "--property=DeviceAllow=/dev/kvm rw")
    for use_nspawn in (False, True):
        bind, args, said = plugin.kvm_plan(False, use_nspawn, True)
        assert (bind, args) == (False, ())
        assert "TCG" in said and "config_opts['plugin_conf']['hshelper_opts']['kvm'] = True" \
            in said
    assert plugin.kvm_plan(True, False, True)[:2] == (True, ())
    assert plugin.kvm_plan(True, True, True)[:2] == (False, nspawn_kvm)
    bind, args, said = plugin.kvm_plan(True, True, False)
    assert (bind, args) == (False, ()) and "no /dev/kvm" in said and "TCG" in said
    assert plugin.options({})["kvm"] is False
    assert plugin.step_argv("helper-run true", {"A": "1"}) == \
        ["/usr/bin/env", "A=1", "/bin/sh", "-c", "helper-run true"]
    assert plugin.step_argv(["helper-run", "true"], {}) == ["/usr/bin/env", "helper-run", "true"]


@pytest.fixture
def mock_dirs(tmp_path):
    """A result dir owned by mock's caller and a plugin dir as mock's."""
    result = tmp_path / "result"
    result.mkdir()
    os.chown(result, RESULT_OWNER, RESULT_OWNER)
    plugins = mock_standins.plugin_dir(tmp_path / "plugins", MOCK_PLUGIN_DIR / "hshelper.py")
    return tmp_path, result, plugins


def standin_config(rootdir, mock_dirs, opts: dict, extra_path: bool = True) -> dict:
    top, result, plugins = mock_dirs
    config = mock_standins.config(rootdir, result, top / "mockdir", plugins)
    config["plugins"].append("hshelper")
    config["plugin_conf"].update(hshelper_enable=True, hshelper_opts=opts)
    if extra_path:
        # The test roots have hshelper in /usr/local/bin (tests/chroot.py); the packages
        # put it in /usr/bin, which mock's default PATH has.
        config["environment"]["PATH"] = "/usr/local/bin:" + config["environment"]["PATH"]
    return config


def hshelper_hooks(plugins) -> dict[str, list[str]]:
    """The stages the hshelper plugin hooked (the bind_mount stand-in hooks too)."""
    return {stage: [h.__name__ for h in hooks if type(h.__self__).__name__ == "HshelperStep"]
            for stage, hooks in plugins._hooks.items()
            if any(type(h.__self__).__name__ == "HshelperStep" for h in hooks)}


@pytest.mark.parametrize("honours", [True, False], ids=["mock-5", "mock-4"])
def test_mock_plugin_does_nothing_in_the_bootstrap_buildroot(tmp_path, mock_dirs,
                                                              monkeypatch, honours):
    """mock initialises plugins for its bootstrap chroot too (its own Plugins, a deep
    copy of plugin_conf): no hook, no mount, no nspawn argument there, whether mock
    honours run_in_bootstrap (5.0 and later) or not."""
    mock_standins.install(monkeypatch, use_nspawn=True)
    config = standin_config(tmp_path / "root", mock_dirs, {"command": "true", "kvm": True})
    buildroot = mock_standins.buildroots(config, honours_run_in_bootstrap=honours)
    bootstrap = buildroot.bootstrap_buildroot
    assert bootstrap.is_bootstrap and hshelper_hooks(bootstrap.plugins) == {}
    assert bootstrap.mounts.user_mounts == []
    assert bootstrap.config["nspawn_args"] == ["--capability=cap_ipc_lock"]
    assert hshelper_hooks(buildroot.plugins) == {"postbuild": ["run_step"]}


def test_mock_standin_rejects_env_for_dochroot_as_mock_does(tmp_path, mock_dirs, monkeypatch):
    """mock's doChroot makes the environment itself: a caller's env= is a TypeError
    (the bug the old plugin had, which the old stand-in hid)."""
    mock_standins.install(monkeypatch)
    config = standin_config(tmp_path / "root", mock_dirs, {})
    buildroot = mock_standins.buildroots(config)
    with pytest.raises(TypeError, match="multiple values for keyword argument 'env'"):
        buildroot.doChroot(["true"], shell=False, env={"A": "1"})


def test_mock_plugin_without_a_command_does_nothing(tmp_path, mock_dirs, monkeypatch):
    mock_standins.install(monkeypatch)
    config = standin_config(tmp_path / "root", mock_dirs, {})
    buildroot = mock_standins.buildroots(config)
    assert hshelper_hooks(buildroot.plugins) == {}


def test_mock_nspawn_gets_dev_kvm_only_when_switched_on(tmp_path, mock_dirs, monkeypatch):
    """systemd-nspawn isolation: the container mock would start for the step (recorded
    by the stand-in, which starts none) has /dev/kvm only with 'kvm': True; mock's own
    nspawn_args stay first, the step runs as the build user in its workdir, with
    mock's environment and the plugin's variables."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("the host has no /dev/kvm: the plugin then adds nothing either way")
    for kvm in (False, True):
        mock_standins.install(monkeypatch, use_nspawn=True)
        root = tmp_path / f"root-{kvm}"
        (root / "builddir/build/RPMS").mkdir(parents=True)
        config = standin_config(root, mock_dirs, {"command": "helper-run true", "kvm": kvm})
        buildroot = mock_standins.buildroots(config)
        buildroot.finish_init()
        buildroot.state.result = "success"
        with pytest.raises(mock_standins.Error, match="does not start systemd-nspawn"):
            buildroot.plugins.call_hooks("postbuild")
        [run] = mock_standins.RUNS
        argv = run["command"]
        assert argv[:2] == ["/usr/bin/systemd-nspawn", "-q"]
        assert argv[argv.index("-u") + 1] == "mockbuild"
        assert "--chdir=/builddir/hshelper" in argv and "--setenv=HOME=/builddir" in argv
        assert argv[-3:] == ["/bin/sh", "-c", "helper-run true"] and "/usr/bin/env" in argv
        assert "--capability=cap_ipc_lock" in argv
        assert ("--bind=/dev/kvm" in argv) is kvm
        assert ("--property=DeviceAllow=/dev/kvm rw" in argv) is kvm
        assert (config["nspawn_args"].count("--bind=/dev/kvm")) == int(kvm)
        assert buildroot.mounts.user_mounts == []  # nspawn makes its own /dev


def test_mock_collect_never_follows_symlinks_and_keeps_holes(tmp_path):
    plugin = load_plugin()
    work, result = tmp_path / "work", tmp_path / "result"
    work.mkdir()
    result.mkdir()
    with open(work / "disk.img", "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"data in the middle")
    (work / "leak").symlink_to("/etc/hostname")
    copied = plugin.collect(str(work), ["*"], str(result), (os.getuid(), os.getgid()))
    assert copied == ["disk.img"] and sorted(os.listdir(result)) == ["disk.img"]
    assert (result / "disk.img").read_bytes() == (work / "disk.img").read_bytes()
    assert (result / "disk.img").stat().st_blocks * 512 < 1 << 20  # still sparse


# ------------------------------------------------------------------ mock: real chroots


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
        with contextlib.suppress(FileNotFoundError):
            if not (bookworm / "dev/kvm").is_char_device():
                (bookworm / "dev/kvm").unlink()  # a mount point the plugin made


def in_chroot(buildroot, script: str):
    """``sh -c script`` in the build root as the build user, through mock's doChroot."""
    return buildroot.doChroot(["/bin/sh", "-c", script], shell=False, raiseExc=False,
                              uid=buildroot.chrootuid, gid=buildroot.chrootgid,
                              returnOutput=True)


@pytest.mark.slow
def test_mock_chroot_has_no_dev_kvm_by_default(mock_root, mock_dirs, monkeypatch, caplog):
    """Simple isolation, the default options: nothing is bind-mounted, the build user
    finds no /dev/kvm in the chroot, and the log says helper-run uses TCG and how to
    switch KVM on."""
    mock_standins.install(monkeypatch)
    config = standin_config(mock_root, mock_dirs, {"command": "true"})
    with caplog.at_level(logging.INFO, logger="mockbuild"):
        buildroot = mock_standins.buildroots(config)
        buildroot.finish_init()
    try:
        assert buildroot.mounts.user_mounts == []
        output, status = in_chroot(buildroot, "test -e /dev/kvm && echo present || echo absent")
        assert (output, status) == ("absent\n", 0)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "TCG" in said and "['hshelper_opts']['kvm'] = True" in said
    finally:
        buildroot.finalize()


@pytest.mark.slow
def test_mock_chroot_gets_dev_kvm_when_switched_on(mock_root, mock_dirs, monkeypatch):
    """Simple isolation, 'kvm': True: the host's /dev/kvm is bind-mounted into the
    chroot (a mount point made at postinit, mounted after it, as mock orders them) and
    the build user sees the same character device; unmounted at the end."""
    host = Path("/dev/kvm")
    if not host.is_char_device():
        pytest.skip("the host has no /dev/kvm to give the chroot")
    mock_standins.install(monkeypatch)
    config = standin_config(mock_root, mock_dirs, {"command": "true", "kvm": True})
    buildroot = mock_standins.buildroots(config)
    buildroot.finish_init()
    try:
        output, status = in_chroot(buildroot, "stat -c '%F %t:%T' /dev/kvm")
        rdev = host.stat().st_rdev
        assert status == 0
        assert output == f"character special file {os.major(rdev):x}:{os.minor(rdev):x}\n"
    finally:
        buildroot.finalize()
    assert not (mock_root / "dev/kvm").is_char_device()


STEP = ("helper-run --disk disk.img,size=64M,name=out sh -c "
        "'mkfs.ext4 -q -L mockimg $HSHELPER_DISK_OUT && id -u > guest-uid.txt && "
        "echo \"$HSHELPER_RPMS\" > rpms.txt'")


def postbuild(config, result="success"):
    buildroot = mock_standins.buildroots(config)
    buildroot.finish_init()
    buildroot.state.result = result
    try:
        buildroot.plugins.call_hooks("postbuild")
    finally:
        buildroot.finalize()
    return buildroot


@pytest.mark.slow
@pytest.mark.vm
def test_mock_postbuild_runs_the_step_as_the_build_user(mock_root, mock_dirs, monkeypatch):
    mock_standins.install(monkeypatch)
    config = standin_config(mock_root, mock_dirs,
                            {"command": STEP, "artifacts": ["disk.img", "*.txt"]})
    postbuild(config)
    [run] = mock_standins.RUNS
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert (run["uid"], run["gid"], run["cwd"]) == (BUILDER, BUILDER, "/builddir/hshelper")
    assert run["env"]["HOME"] == "/builddir"  # mock's environment, from buildroot.env
    resultdir = mock_dirs[1]
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
def test_mock_postbuild_after_a_failed_build_runs_nothing(mock_root, mock_dirs, monkeypatch):
    mock_standins.install(monkeypatch)
    postbuild(standin_config(mock_root, mock_dirs, {"command": STEP}), result="fail")
    assert mock_standins.RUNS == [] and os.listdir(mock_dirs[1]) == []


@pytest.mark.slow
@pytest.mark.vm
def test_mock_failing_step_fails_the_hook_and_keeps_its_report(mock_root, mock_dirs,
                                                               monkeypatch):
    mock_standins.install(monkeypatch)
    config = standin_config(mock_root, mock_dirs, {
        "command": ["helper-run", "sh", "-c", "echo partial > p.txt; exit 3"]})
    with pytest.raises(mock_standins.Error) as failed:
        postbuild(config)
    assert failed.value.resultcode == 3
    resultdir = mock_dirs[1]
    assert (resultdir / "p.txt").read_text() == "partial\n"
    assert json.loads((resultdir / "hshelper-report.json").read_text())["status"] == 3


DEMO_SPEC = """Name: hsh-demo
Version: 1.0
Release: 1
Summary: hshelper mock test
License: GPL-2.0-or-later
BuildArch: noarch
# No requirements: the image's base system is Debian, without an RPM database.
AutoReqProv: no
%description
A file, installed into a disk image after the build.
%install
install -d %{buildroot}/usr/share/hsh-demo
echo 'made by rpmbuild' > %{buildroot}/usr/share/hsh-demo/hello
%files
/usr/share/hsh-demo
"""
MOCK_BASE_DIR = Path("/var/lib/hshelper-base")  # the host directory the mock example binds


@contextlib.contextmanager
def host_base_dir(where: Path, base: Path):
    """``where``/base.tar for the duration, made and removed by this test only (a
    lock keeps parallel checkouts of this test apart)."""
    with buildroots._locked(where.with_name(where.name + ".lock")):
        if where.exists():
            pytest.skip(f"{where} exists: the documented example's base directory is in use")
        where.mkdir(parents=True)
        try:
            os.link(base, where / "base.tar")
            yield where
        finally:
            shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def packaged_root(debs):
    """A Debian 12 root where apt installed this checkout's .debs (hshelper from
    /usr/bin, the integration files in /usr/share/hshelper), with pbuilder and rpm
    (buildroots.tools_root, cached), under a private overlay; /proc and a /dev/shm
    tmpfs mounted, and the build user's home."""
    lower = buildroots.tools_root([debs.run, debs.python])
    with buildroots.apt_overlay([debs.run, debs.python], lower) as (root, _):
        home = root / chroot.HOME.lstrip("/")
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, BUILDER, BUILDER)
        with chroot.proc_mounted(root), chroot.shm_mounted(root):
            yield root


def build_demo_rpm(top: Path, *how: str) -> Path:
    """rpmbuild HOW (-bb or -bs) of DEMO_SPEC on the host; returns the package."""
    (top / "SPECS").mkdir(parents=True)
    (top / "SPECS/hsh-demo.spec").write_text(DEMO_SPEC)
    built = subprocess.run(["rpmbuild", *how, "--define", f"_topdir {top}",
                            str(top / "SPECS/hsh-demo.spec")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    [package] = (top / ("SRPMS" if "-bs" in how else "RPMS")).rglob("*.rpm")
    return package


@pytest.mark.slow
@pytest.mark.vm
def test_mock_documented_example_makes_an_image_of_the_built_rpm(packaged_root, mock_dirs,
                                                                 monkeypatch, image_base,
                                                                 tmp_path):
    """The mock configuration of docs/integrations.md, exactly as written, run by the
    stand-ins on a root with the packages installed and rpm: after the build, the RPM it
    made is installed into the base system's image in the VM (rpm --root), and the
    result dir gets the image, its report and SHA256SUMS."""
    root = packaged_root
    rpms = root / "builddir/build/RPMS/noarch"
    rpms.mkdir(parents=True)
    shutil.copy(build_demo_rpm(tmp_path / "rpmbuild", "-bb"), rpms)
    subprocess.run(["chown", "-R", f"{BUILDER}:{BUILDER}", str(root / "builddir")],
                   check=True)
    mock_standins.install(monkeypatch)
    config = standin_config(root, mock_dirs, {}, extra_path=False)
    del config["plugin_conf"]["hshelper_opts"], config["plugin_conf"]["hshelper_enable"]
    config["plugins"].remove("hshelper")
    exec(doc_snippet("mock-config"), {"config_opts": config})  # noqa: S102
    with host_base_dir(MOCK_BASE_DIR, image_base):
        postbuild(config)
    [run] = [r for r in mock_standins.RUNS if r["cwd"] == "/builddir/hshelper"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    resultdir = mock_dirs[1]
    assert sorted(os.listdir(resultdir)) == ["SHA256SUMS", "hshelper-report.json",
                                             "image.img", "image.mkimage.json"]
    check_image_result(resultdir, tmp_path, "made by rpmbuild\n")


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


@pytest.mark.slow
@pytest.mark.vm
def test_hasher_rebuild_prog_makes_an_image_of_the_rebuilt_rpm(packaged_root, image_base,
                                                              tmp_path):
    """integrations/hasher/rebuild-with-hshelper as hasher runs it (instead of rpmbuild
    --rebuild, with the same arguments, as the builder in the chroot), its default
    STEP, in a root with the packages installed and rpm: the source RPM is rebuilt and
    the RPM it made is installed into an image of /usr/share/hshelper-base/base.tar
    (the base package's file), left in ~/RPM/hshelper with its report and SHA256SUMS.
    hasher itself is not in Debian: ALT's %_topdir (~/RPM) is given with --define."""
    root = packaged_root
    work = chroot.fresh_dir(root, "hasher")
    shutil.copy(build_demo_rpm(tmp_path / "rpmbuild", "-bs"), root / work.lstrip("/"))
    base_dir = root / "usr/share/hshelper-base"
    base_dir.mkdir(parents=True)
    shutil.copy(image_base, base_dir / "base.tar")
    proc = chroot.run(root, ["/usr/share/hshelper/integrations/hasher/rebuild-with-hshelper",
                             "--define", "_topdir /home/builder/RPM",
                             "hsh-demo-1.0-1.src.rpm"], cwd=work, timeout=1800)
    err = proc.stderr.decode()[-4000:]
    assert proc.returncode == 0, err
    out = root / "home/builder/RPM/hshelper"
    # (.cache: hshelper's, the step's HOME being its directory: nobody has none.)
    assert sorted(n for n in os.listdir(out) if n != ".cache") == [
        "SHA256SUMS", "hshelper-report.json", "image.img", "image.mkimage.json"], err
    assert (out / "image.img").stat().st_uid == BUILDER
    check_image_result(out, tmp_path, "made by rpmbuild\n")


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


def demo_source(top: Path, made_by: str) -> Path:
    """A tiny Debian source package that needs hshelper to build (Build-Depends:
    hshelper) and installs one file saying who built it; returns its directory."""
    files = {
        "debian/control": (
            "Source: hsh-demo\nSection: misc\nPriority: optional\n"
            "Maintainer: Test <t@localhost>\nBuild-Depends: hshelper\n"
            "Standards-Version: 4.6.2\nRules-Requires-Root: no\n\n"
            "Package: hsh-demo\nArchitecture: all\nDescription: hshelper build-root test\n"
            " A file, installed into a disk image after the build.\n"),
        "debian/changelog": (
            "hsh-demo (1.0) unstable; urgency=medium\n\n  * Test.\n\n"
            " -- Test <t@localhost>  Thu, 26 Nov 2026 00:00:00 +0000\n"),
        "debian/source/format": "3.0 (native)\n",
        # No debhelper: the chroots need nothing beyond build-essential (no network).
        "debian/rules": (
            "#!/usr/bin/make -f\n"
            "build build-arch build-indep binary-arch:\n"
            "binary binary-indep:\n"
            "\tinstall -d debian/tmp/DEBIAN debian/tmp/usr/share/hsh-demo\n"
            f"\techo '{made_by}' > debian/tmp/usr/share/hsh-demo/hello\n"
            "\tdpkg-gencontrol -phsh-demo -Pdebian/tmp\n"
            "\tdpkg-deb --root-owner-group --build debian/tmp ..\n"
            "clean:\n\trm -rf debian/tmp debian/files\n"),
    }
    src = top / "hsh-demo-1.0"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (src / "debian/rules").chmod(0o755)
    return src


def subuid_base(name: str) -> int | None:
    for line in Path("/etc/subuid").read_text().splitlines():
        user, start, _ = line.split(":")
        if user == name:
            return int(start)
    return None


def test_sbuildrc_example_is_the_documented_one():
    assert (SRC / "integrations/sbuild/sbuildrc.example").read_text() == \
        doc_snippet("sbuildrc")


@contextlib.contextmanager
def sbuild_user_dirs(home: Path, base: Path):
    """~/hshelper-base/base.tar and ~/hshelper-out of the sbuild user, as the
    documented sbuildrc expects them, for one test at a time."""
    with buildroots._locked(home / ".hshelper-test.lock"):
        base_dir, out = home / "hshelper-base", home / "hshelper-out"
        for path in (base_dir, out):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
        os.link(base, base_dir / "base.tar")
        subprocess.run(["chown", "-R", f"{SBUILD_USER}:{SBUILD_USER}", str(base_dir),
                        str(out)], check=True)
        out.chmod(0o777)  # written by sbuild's root: the first subordinate uid
        try:
            yield out
        finally:
            for path in (base_dir, out):
                shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.vm
def test_sbuild_builds_with_build_depends_hshelper_and_the_step_makes_a_bootable_image(
        debs, image_base, tmp_path):
    """Real sbuild (unshare mode, as an unprivileged user, the chroot tarball made by
    mmdebstrap) with the documented sbuildrc as it is written: a package that declares
    Build-Depends: hshelper builds with this checkout's .debs as extra packages; the
    finished-build step installs the built .deb into an image of the base system, which
    lands with its report and SHA256SUMS, boots with UEFI and shows the package's file.
    The starting-build command's /dev/kvm shows in the report's accelerator reason."""
    for tool in ("sbuild", "mmdebstrap", "newuidmap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (packages sbuild, mmdebstrap, uidmap)")
    if subprocess.run(["id", SBUILD_USER], capture_output=True).returncode:
        pytest.skip(f"no user {SBUILD_USER} (scripts/setup makes it)")
    if subuid_base(SBUILD_USER) is None:
        pytest.skip(f"{SBUILD_USER} has no /etc/subuid range (unshare mode needs one)")
    tarball = sbuild_tarball()
    ws = Path(tempfile.mkdtemp(prefix="hshelper-sbuild-test.", dir="/var/tmp"))
    try:
        demo_source(ws, "made by sbuild")
        for deb in (debs.run, debs.python):
            shutil.copy(deb, ws)
        (ws / "build").mkdir()
        (ws / "sbuildrc").write_text(doc_snippet("sbuildrc"))
        subprocess.run(["chown", "-R", f"{SBUILD_USER}:{SBUILD_USER}", str(ws)], check=True)
        ws.chmod(0o755)
        home = Path(f"/home/{SBUILD_USER}")
        as_user = ["runuser", "-u", SBUILD_USER, "--", "env", f"HOME={home}",
                   f"SBUILD_CONFIG={ws}/sbuildrc"]
        dsc = subprocess.run([*as_user, "sh", "-c", f"cd {ws} && dpkg-source -b hsh-demo-1.0"],
                             capture_output=True, text=True)
        assert dsc.returncode == 0, dsc.stderr
        with sbuild_user_dirs(home, image_base) as out:
            proc = subprocess.run(
                [*as_user, "sh", "-c", f'cd {ws}/build && exec "$@"', "sbuild",
                 "sbuild", f"--chroot={tarball}", "--dist=bookworm", "--arch-all",
                 "--no-source", "--no-run-lintian", "--no-run-piuparts",
                 "--no-run-autopkgtest", "--no-apt-update", "--no-apt-upgrade",
                 "--no-apt-distupgrade", f"--extra-package={ws / debs.run.name}",
                 f"--extra-package={ws / debs.python.name}", f"{ws}/hsh-demo_1.0.dsc"],
                capture_output=True, text=True, timeout=1800)
            logs = sorted((ws / "build").glob("*.build"))
            log = (logs[-1].read_text(errors="replace") if logs else proc.stdout)
            tail = log[-6000:] + proc.stderr[-2000:]
            assert proc.returncode == 0, tail
            assert list((ws / "build").glob("hsh-demo_1.0_all.deb")), tail
            assert re.search(r"Setting up hshelper \(", log), tail  # from Build-Depends
            assert sorted(os.listdir(out)) == ["SHA256SUMS", "hshelper-report.json",
                                               "image.img", "image.mkimage.json"], tail
            # Copied by root inside sbuild's namespace: the first subordinate uid.
            assert (out / "image.img").stat().st_uid == subuid_base(SBUILD_USER)
            report = check_image_result(out, tmp_path, "made by sbuild\n", boot=True)
            reason = report["accelerator"]["reason"]
            if Path("/dev/kvm").is_char_device():
                # hshelper-chroot-setup bound the host's node: the probe found a device.
                assert "/dev/kvm does not exist" not in reason, reason
                assert report["accelerator"]["name"] in ("kvm", "tcg")
            else:
                assert "/dev/kvm does not exist" in reason, reason
                assert "no /run/hshelper-host-dev/kvm: the build uses TCG" in log, tail
    finally:
        shutil.rmtree(ws, ignore_errors=True)


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


# ------------------------------------------------------------------ pbuilder


# The test's own pbuilder configuration, read after the documented one (~/.pbuilderrc):
# the .debs of this checkout come from a local repository, which a D hook makes known to
# apt in the build chroot; the hook directory holds that D hook and, linked, the B hook
# where the package installed it (pbuilder copies hooks with cp -L).
PBUILDER_TEST_RC = """HOOKDIR=/root/hshelper-test-hooks
BINDMOUNTS="$BINDMOUNTS /var/cache/pbuilder/hshelper-repo"
BUILDRESULT=/root/result
APTCACHE=""
"""
PBUILDER_D_HOOK = """#!/bin/sh
set -e
echo 'deb [trusted=yes] file:///var/cache/pbuilder/hshelper-repo ./' \\
    >/etc/apt/sources.list.d/hshelper-repo.list
apt-get update -q -o Dir::Etc::sourcelist=sources.list.d/hshelper-repo.list \\
    -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0
"""


@pytest.mark.slow
@pytest.mark.vm
def test_pbuilder_b_hook_makes_an_image_of_the_built_package(debs, image_base, tmp_path):
    """Real pbuilder in a Debian 12 root where apt installed this checkout's .debs and
    where its base tarball was made once by pbuilder create (cached): the documented
    pbuilderrc as ~/.pbuilderrc, a package that declares Build-Depends: hshelper, and
    the B hook from where the package put it; the hook's step installs the built .deb
    into an image of the base system, which lands with its report and SHA256SUMS; its
    root filesystem, read on the host, has the package's file."""
    for tool in ("mmdebstrap", "chroot"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    lower = buildroots.tools_root([debs.run, debs.python])
    with buildroots.apt_overlay([debs.run, debs.python], lower) as (root, _):
        installed_hook = root / "usr/share/hshelper/integrations/pbuilder/B90hshelper"
        assert installed_hook.is_file() and os.access(installed_hook, os.X_OK)
        (root / "root/.pbuilderrc").write_text(doc_snippet("pbuilderrc"))
        (root / "root/test.pbuilderrc").write_text(PBUILDER_TEST_RC)
        hooks = root / "root/hshelper-test-hooks"
        hooks.mkdir()
        (hooks / "B90hshelper").symlink_to(
            "/usr/share/hshelper/integrations/pbuilder/B90hshelper")
        (hooks / "D10hshelper-repo").write_text(PBUILDER_D_HOOK)
        (hooks / "D10hshelper-repo").chmod(0o755)
        repo = root / "var/cache/pbuilder/hshelper-repo"
        repo.mkdir(parents=True)
        for deb in (debs.run, debs.python):
            shutil.copy(deb, repo)
        data = root / "var/cache/pbuilder/hshelper"
        (data / "out").mkdir(parents=True)
        shutil.copy(image_base, data / "base.tar")
        demo_source(root / "root/src", "made by pbuilder")
        with chroot.proc_mounted(root):
            prepare = subprocess.run(
                ["chroot", str(root), "sh", "-c",
                 "cd /var/cache/pbuilder/hshelper-repo && dpkg-scanpackages . > Packages && "
                 "cd /root/src && dpkg-source -b hsh-demo-1.0"],
                capture_output=True, text=True, env=buildroots.APT_ENV)
            assert prepare.returncode == 0, prepare.stderr
            proc = subprocess.run(
                ["chroot", str(root), "/usr/bin/env", "-i",
                 *[f"{k}={v}" for k, v in buildroots.APT_ENV.items()],
                 "pbuilder", "build", "--configfile", "/root/test.pbuilderrc",
                 "/root/src/hsh-demo_1.0.dsc"],
                capture_output=True, text=True, timeout=1800)
        log = proc.stdout[-8000:] + proc.stderr[-2000:]
        assert proc.returncode == 0, log
        assert list((root / "root/result").glob("hsh-demo_1.0_all.deb")), log
        assert "Setting up hshelper (" in proc.stdout, log  # from Build-Depends
        assert "user script /var/cache/pbuilder/build/" in proc.stdout and \
            "B90hshelper starting" in proc.stdout, log
        out = data / "out"
        assert sorted(os.listdir(out)) == ["SHA256SUMS", "hshelper-report.json",
                                           "image.img", "image.mkimage.json"], log
        check_image_result(out, tmp_path, "made by pbuilder\n")


def test_pbuilder_hook_without_a_step_does_nothing(tmp_path):
    """The B hook without HSHELPER_STEP: a message, status 0, no work."""
    proc = subprocess.run(["sh", str(SRC / "integrations/pbuilder/B90hshelper")],
                          capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "BUILDDIR": str(tmp_path)})
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert os.listdir(tmp_path) == []

"""hshelper as the distributions ship it: one version everywhere, the release tarball
made by the documented command, the Debian packages built from it by dpkg-buildpackage
and checked by lintian, and installed by apt into a clean Debian 12 root where
helper-run then works as an unprivileged user (a disk job checked on the host).

The RPM side (the spec built by rpmbuild from the same tarball) is in
tests/test_integrations.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import buildroots
import chroot
import imagecheck
import packages
import pytest

import hshelper

SRC = packages.SRC
SPEC = SRC / "packaging/hshelper.spec"


def pyproject_version() -> str:
    text = (SRC / "pyproject.toml").read_text()
    return re.search(r'^version = "(.*)"$', text, re.M).group(1)


def spec_version() -> str:
    return re.search(r"^Version:\s*(\S+)$", SPEC.read_text(), re.M).group(1)


def changelog_version() -> str:
    """debian/changelog's upstream version (before the Debian revision)."""
    out = subprocess.run(["dpkg-parsechangelog", "-l", str(SRC / "debian/changelog"),
                          "-S", "Version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().rsplit("-", 1)[0]


def test_one_version_everywhere():
    cli = subprocess.run([sys.executable, "-m", "hshelper", "--version"],
                         capture_output=True, text=True, cwd=SRC)
    assert cli.returncode == 0, cli.stderr
    found = {"hshelper.__version__": hshelper.__version__,
             "hshelper --version": cli.stdout.split()[-1],
             "pyproject.toml": pyproject_version(),
             "packaging/hshelper.spec": spec_version(),
             "debian/changelog": changelog_version(),
             "scripts/release-tarball": packages.version()}
    assert len(set(found.values())) == 1, found


def test_release_tarball_is_what_the_spec_and_debian_expect(tmp_path):
    """The documented command makes the spec's Source0 (name, top directory
    %setup expects) holding every file git tracks, the LICENSE among them."""
    if not shutil.which("git") or not (SRC / ".git").exists():
        pytest.skip("not a git checkout: scripts/release-tarball archives git's files")
    tarball = packages.release_tarball(tmp_path)
    version = packages.version()
    parsed = subprocess.run(["rpmspec", "-P", str(SPEC)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    source0 = re.search(r"^Source0:\s*(\S+)$", parsed.stdout, re.M).group(1)
    assert tarball.name == source0 == f"hshelper-{version}.tar.gz"
    with tarfile.open(tarball) as tar:
        names = {m.name for m in tar.getmembers() if not m.isdir()}
    tracked = subprocess.run(["git", "ls-files"], cwd=SRC, capture_output=True, text=True,
                             check=True).stdout.split()
    assert names == {f"hshelper-{version}/{name}" for name in tracked}
    assert f"hshelper-{version}/LICENSE" in names
    assert f"hshelper-{version}/debian/control" in names


def test_license_is_the_gpl2_the_metadata_names():
    text = (SRC / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text
    assert 'license = { text = "GPL-2.0-or-later" }' in (SRC / "pyproject.toml").read_text()
    assert re.search(r"^License:\s*GPL-2.0-or-later$", SPEC.read_text(), re.M)
    assert re.search(r"^%license LICENSE$", SPEC.read_text(), re.M)
    assert "License: GPL-2+" in (SRC / "debian/copyright").read_text()


# ------------------------------------------------------------------ Debian packages


def deb_files(deb: Path) -> dict[str, str]:
    """path -> mode string of every entry in the package."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                         check=True).stdout
    files = {}
    for line in out.splitlines():
        fields = line.split()
        files[fields[5].removeprefix(".")] = fields[0]
    return files


def test_debian_packages_are_lintian_clean(debs):
    """dpkg-buildpackage built both packages (the fixture); lintian, with the
    overrides debian/ documents, finds no error or warning in the source or binaries."""
    proc = subprocess.run(["lintian", "--fail-on", "error,warning", str(debs.changes)],
                          capture_output=True, text=True, env=packages.CLEAN_ENV)
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_debian_packages_mirror_the_rpm_split(debs):
    files = deb_files(debs.python)
    for command in ("/usr/bin/hshelper", "/usr/bin/helper-run"):
        assert files[command].startswith("-rwxr-xr-x")
        assert f"/usr/share/man/man1/{command.rsplit('/', 1)[1]}.1.gz" in files
    assert "/usr/lib/python3/dist-packages/hshelper/plugins/vmrun.py" in files
    assert "/usr/lib/python3/dist-packages/hshelper/recipes/mkimage.sh" in files
    # The integration files at the RPM's path, every one the tree has, modes kept.
    share = "/usr/share/hshelper/integrations/"
    tracked = subprocess.run(["git", "ls-files", "-s", "integrations"], cwd=SRC,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    for line in tracked:
        mode, path = line.split()[0], line.split()[3]
        entry = files[share + path.removeprefix("integrations/")]
        assert entry.startswith("-rwxr-xr-x" if mode == "100755" else "-rw-r--r--"), path
    depends = packages.deb_field(debs.run, "Depends")
    version = packages.deb_field(debs.python, "Version")
    for needed in ("qemu-system-x86", "linux-image-amd64", "qemu-utils", "e2fsprogs",
                   "fdisk", "dosfstools", f"python3-hshelper (= {version})"):
        assert needed in depends, depends
    assert packages.deb_field(debs.run, "Provides") == "hshelper-run"
    assert packages.deb_field(debs.run, "Architecture") == "amd64"
    assert packages.deb_field(debs.python, "Architecture") == "all"
    assert "hshelper" in packages.deb_field(debs.python, "Recommends")


# ------------------------------------------------------------------ installed by apt

DISK_JOB = """set -e
printf 'label: gpt\\n,,L\\n' | sfdisk -q "$HSHELPER_DISK_OUT"
mkfs.ext4 -q -L aptdisk "${HSHELPER_DISK_OUT}1"
mkdir -p /tmp/m && mount "${HSHELPER_DISK_OUT}1" /tmp/m
id -u > /tmp/m/guest-uid
umount /tmp/m
"""


@pytest.mark.slow
@pytest.mark.vm
def test_apt_installs_the_debs_and_helper_run_works_unprivileged(debs, tmp_path):
    """apt-get install ./hshelper_*.deb ./python3-hshelper_*.deb in a clean Debian 12
    root (made by mmdebstrap; the dependencies pulled from the archive by that very
    command when the root was made, see buildroots.apt_root), then helper-run from
    /usr/bin as uid 65534 partitions and formats a disk, checked on the host."""
    with buildroots.apt_overlay([debs.run, debs.python]) as (root, apt):
        assert "Setting up python3-hshelper" in apt.stdout, apt.stdout[-3000:]
        assert "Setting up hshelper " in apt.stdout, apt.stdout[-3000:]
        work = root / "tmp/work"
        work.mkdir()
        os.chown(work, chroot.BUILD_UID, chroot.BUILD_UID)
        env = {"HOME": "/tmp/work", "USER": "nobody"}
        with chroot.proc_mounted(root):
            which = chroot.run(root, ["sh", "-c", "command -v helper-run"], cwd="/tmp/work",
                               env=env)
            assert which.stdout == b"/usr/bin/helper-run\n"
            proc = chroot.run(root, ["helper-run", "--report", "report.json",
                                     "--disk", "disk.img,size=64M,name=out",
                                     "sh", "-c", DISK_JOB], cwd="/tmp/work", env=env,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        image = work / "disk.img"
        assert image.stat().st_uid == chroot.BUILD_UID
        layout = imagecheck.layout(image)
        assert layout.label == "gpt" and len(layout.partitions) == 1
        part = imagecheck.extract(image, layout.partitions[0], tmp_path / "p1.ext4")
        fsck = imagecheck.fsck(part, "ext4")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert imagecheck.probe(part)["LABEL"] == "aptdisk"
        assert imagecheck.ext_cat(part, "/guest-uid") == "0\n"  # root in the VM
        report = json.loads((work / "report.json").read_text())
        assert report["status"] == 0
        assert report["kernel"]["version"].endswith("-amd64")


def test_every_debian_architecture_has_its_qemu_and_kernel():
    """The run package is built for the architectures debian/control lists; debian/rules
    names the qemu system package and the generic kernel of each (Debian 12 names)."""
    rules = (SRC / "debian/rules").read_text()
    qemu = dict(re.findall(r"^QEMU_(\S+) = (\S+)$", rules, re.M))
    kernel = dict(re.findall(r"^KERNEL_(\S+) = (\S+)$", rules, re.M))
    control = (SRC / "debian/control").read_text()
    block = control[control.index("\nPackage: hshelper\n"):]
    archs = re.search(r"^Architecture: (.*)$", block, re.M).group(1).split()
    assert sorted(qemu) == sorted(kernel) == sorted(archs)
    assert qemu == {"amd64": "qemu-system-x86", "i386": "qemu-system-x86",
                    "arm64": "qemu-system-arm", "armhf": "qemu-system-arm",
                    "ppc64el": "qemu-system-ppc", "s390x": "qemu-system-misc",
                    "riscv64": "qemu-system-misc"}
    assert all(name.startswith("linux-image-") for name in kernel.values())

"""This checkout as its distributions ship it: the release tarball made by the documented
command (scripts/release-tarball), and the Debian packages built from it with
dpkg-buildpackage, as a packager would (tests/test_packaging.py and the sbuild,
pbuilder and apt tests use them)."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
# A packager's environment, not the test runner's (a pyenv python on PATH would build
# the wheel with the wrong interpreter).
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}


def version() -> str:
    text = (SRC / "hshelper/__init__.py").read_text()
    return re.search(r'^__version__ = "(.*)"$', text, re.M).group(1)


def release_tarball(dest: Path) -> Path:
    """scripts/release-tarball DEST, as the README says; returns the tarball."""
    proc = subprocess.run([str(SRC / "scripts/release-tarball"), str(dest)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


@dataclass(frozen=True)
class Debs:
    directory: Path
    run: Path  # hshelper_V-R_ARCH.deb: what a build root needs
    python: Path  # python3-hshelper_V-R_all.deb: module, commands, integrations
    changes: Path
    dsc: Path


def build_debs(dest: Path) -> Debs:
    """The release tarball as the .orig.tar.gz, unpacked, built with dpkg-buildpackage
    -us -uc (source and binaries); the .debs land in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    tarball = release_tarball(dest / "dist")
    upstream = version()
    orig = dest / f"hshelper_{upstream}.orig.tar.gz"
    os.link(tarball, orig)
    with tarfile.open(orig) as tar:
        tar.extractall(dest)
    tree = dest / f"hshelper-{upstream}"
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc"], cwd=tree, env=CLEAN_ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    [run] = dest.glob("hshelper_*.deb")
    [python] = dest.glob("python3-hshelper_*_all.deb")
    [changes] = dest.glob("hshelper_*.changes")
    [dsc] = dest.glob("hshelper_*.dsc")
    return Debs(dest, run, python, changes, dsc)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True,
                          text=True, check=True).stdout.strip()

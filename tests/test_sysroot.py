"""Kernel discovery over the layouts distros use, on small synthetic trees."""

from __future__ import annotations

import os

import pytest

from hshelper.errors import HshelperError
from hshelper.sysroot import Sysroot, busybox_applets, parse_kconfig, version_key


def touch(path, data=b"x", mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def test_debian_layout_newest_first(tmp_path):
    for v in ("6.1.0-9-amd64", "6.1.0-28-amd64", "6.12.9-amd64"):
        touch(tmp_path / f"boot/vmlinuz-{v}")
        (tmp_path / f"lib/modules/{v}").mkdir(parents=True)
    touch(tmp_path / "boot/config-6.1.0-28-amd64", b"CONFIG_RD_ZSTD=y\n")
    root = Sysroot(tmp_path)
    assert [k.version for k in root.kernels()] == ["6.12.9-amd64", "6.1.0-28-amd64",
                                                   "6.1.0-9-amd64"]
    chosen = root.kernel("6.1.0-28-amd64")
    assert chosen.image == "/boot/vmlinuz-6.1.0-28-amd64"
    assert chosen.moddir == "/lib/modules/6.1.0-28-amd64"
    assert root.kernel_config(chosen) == {"CONFIG_RD_ZSTD": "y"}


def test_fedora_usr_merged_layout_without_boot(tmp_path):
    (tmp_path / "usr/lib/modules/6.11.4-301.fc41.x86_64").mkdir(parents=True)
    touch(tmp_path / "usr/lib/modules/6.11.4-301.fc41.x86_64/vmlinuz")
    touch(tmp_path / "usr/lib/modules/6.11.4-301.fc41.x86_64/config", b"CONFIG_RD_XZ=y\n")
    os.symlink("usr/lib", tmp_path / "lib")
    kernel = Sysroot(tmp_path).kernel()
    assert kernel.image == "/usr/lib/modules/6.11.4-301.fc41.x86_64/vmlinuz"
    assert kernel.config.endswith("/config")


def test_no_kernel_names_paths_and_package(tmp_path):
    touch(tmp_path / "etc/os-release", b'NAME="ALT"\nID=altlinux\n')
    with pytest.raises(HshelperError) as err:
        Sysroot(tmp_path).kernel()
    text = str(err.value)
    assert "kernel-image-un-def" in text and "/lib/modules/VERSION/vmlinuz" in text


def test_unknown_version_lists_what_exists(tmp_path):
    touch(tmp_path / "boot/vmlinuz-1.2.3")
    with pytest.raises(HshelperError, match="have: 1.2.3"):
        Sysroot(tmp_path).kernel("9.9")


def test_version_key_orders_numerically():
    assert version_key("6.1.0-28") > version_key("6.1.0-9")
    assert version_key("6.12.1") > version_key("6.2.16")


def test_kconfig_parse():
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n'
    assert parse_kconfig(text) == {"CONFIG_A": "y", "CONFIG_C": "x y"}


def test_busybox_applet_table():
    blob = b"\x7fELF junk\0[\0[[\0ash\0cat\0mount\0sh\0zcat\0\x01\x02binary"
    assert busybox_applets(blob) == {"[", "[[", "ash", "cat", "mount", "sh", "zcat"}
    assert busybox_applets(b"no table here") == frozenset()


def test_absolute_symlinks_stay_inside_root(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    touch(tmp_path / "usr/bin/dash", mode=0o755)
    os.symlink("/usr/bin/dash", tmp_path / "usr/bin/sh")
    os.symlink("/etc/passwd", tmp_path / "usr/bin/escape")  # the host's must not be seen
    root = Sysroot(tmp_path)
    assert root.which("sh") == "/usr/bin/sh"
    assert root.resolve("/usr/bin/sh").path == "/usr/bin/dash"
    assert root.which("escape") is None


def _elf_header(machine: int) -> bytes:
    """A 64-bit little-endian ELF header with no segments: enough for read_elf."""
    import struct

    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 64, 0, 0, 64, 56, 0,
                               64, 0, 0)


@pytest.mark.parametrize("machine, package", [(183, "linux-image-arm64"),
                                              (62, "linux-image-amd64")])
def test_the_kernel_hint_names_the_build_roots_architecture(tmp_path, machine, package):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/sh").write_bytes(_elf_header(machine))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text("ID=debian\n")
    root = Sysroot(tmp_path)
    assert root.binary_arch()[0][0] == machine
    assert root.kernel_package_hint() == f"install the kernel package: {package}"

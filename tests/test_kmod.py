"""Module list format and dependency closure on synthetic module trees."""

from __future__ import annotations

import lzma
import subprocess

import pytest

from hshelper import kmod
from hshelper.errors import HshelperError


def tree(tmp_path, dep: str, builtin: str = "", softdep: str = "", alias: str = ""):
    moddir = tmp_path / "lib/modules/1.0"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep)
    (moddir / "modules.builtin").write_text(builtin)
    (moddir / "modules.softdep").write_text(softdep)
    (moddir / "modules.alias").write_text(alias)
    return kmod.load_tree(moddir)


def wanted(*names):
    return kmod.parse_list("\n".join(names), "test")


def test_list_format_comments_optional_include(tmp_path):
    (tmp_path / "more.lst").write_text("loop\n")
    main = tmp_path / "main.lst"
    main.write_text("# base\nvirtio_pci   # transport\n9p?\n\ninclude more.lst\nvirtio-blk\n")
    got = kmod.read_list(main)
    assert [(w.name, w.optional) for w in got] == [
        ("virtio_pci", False), ("9p", True), ("loop", False), ("virtio_blk", False)]
    assert got[2].origin.endswith("more.lst:1")


def test_list_format_errors_name_the_line(tmp_path):
    with pytest.raises(HshelperError, match="x.lst:2"):
        kmod.parse_list("ok\ntwo words\n", "x.lst")


def test_closure_orders_dependencies_first(tmp_path):
    t = tree(tmp_path,
             "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
             "kernel/net/9p/9pnet.ko.xz:\n"
             "kernel/fs/netfs/netfs.ko.xz: kernel/fs/fscache.ko.xz\n"
             "kernel/fs/fscache.ko.xz:\n"
             "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz\n"
             "kernel/lib/crc16.ko.xz:\n"
             "kernel/crypto/crc32c_generic.ko.xz:\n",
             builtin="kernel/drivers/virtio/virtio_pci.ko\n",
             softdep="softdep ext4 pre: crc32c\n",
             alias="alias crc32c crc32c_generic\nalias pci:v00001AF4d* virtio_pci\n")
    plan = kmod.closure(t, wanted("virtio_pci", "ext4", "9p", "missing_one?"))
    names = [n for n, _ in plan.order]
    assert plan.builtin == ("virtio_pci",)
    assert [w.name for w in plan.skipped] == ["missing_one"]
    assert names.index("crc32c_generic") < names.index("ext4")  # soft pre-dep via alias
    assert names.index("crc16") < names.index("ext4")
    assert names.index("fscache") < names.index("netfs") < names.index("9p")
    assert names.index("9pnet") < names.index("9p")
    assert len(names) == len(set(names))


def test_a_soft_dependency_brings_every_module_behind_its_alias(tmp_path):
    # armhf: crc32_arm_ce provides crc32c but needs CPU instructions a guest may lack;
    # modprobe would try both, so the image carries both (and the guest's modprobe
    # succeeds when one of them loads).
    t = tree(tmp_path,
             "kernel/fs/ext4/ext4.ko:\n"
             "kernel/arch/arm/crypto/crc32-arm-ce.ko:\n"
             "kernel/crypto/crc32c_generic.ko:\n",
             softdep="softdep ext4 pre: crc32c\n",
             alias="alias crc32c crc32_arm_ce\nalias crc32c crc32c_generic\n")
    plan = kmod.closure(t, wanted("ext4"))
    assert plan.needs["ext4"] == ("crc32_arm_ce", "crc32c_generic", "ext4")


def test_a_soft_dependency_built_into_the_kernel_brings_nothing(tmp_path):
    t = tree(tmp_path, "kernel/fs/ext4/ext4.ko:\nkernel/crypto/crc32c_intel.ko:\n",
             builtin="kernel/crypto/crc32c_generic.ko\n", softdep="softdep ext4 pre: crc32c\n",
             alias="alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n")
    assert [n for n, _ in kmod.closure(t, wanted("ext4")).order] == ["ext4"]


def test_missing_required_module_is_named(tmp_path):
    t = tree(tmp_path, "kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(HshelperError, match="nosuch"):
        kmod.closure(t, wanted("nosuch"))
    with pytest.raises(HshelperError, match="module b .needed by a"):
        kmod.closure(t, wanted("a"))


def test_decompress_xz_module(tmp_path):
    ko = tmp_path / "m.ko.xz"
    ko.write_bytes(lzma.compress(b"\x7fELF payload", check=lzma.CHECK_CRC32))
    assert kmod.decompress_module(ko) == b"\x7fELF payload"


def test_strip_signature_of_a_real_signed_module(bookworm, tmp_path):
    """A module of the build root's kernel: signed on disk, the same ELF without the
    signature (and the magic) after; an unsigned module is left alone."""
    ko = next((bookworm / "usr/lib/modules").glob("*/kernel/lib/crc16.ko"))
    data = ko.read_bytes()
    assert data.endswith(kmod.SIGNATURE_MAGIC)
    stripped = kmod.strip_signature(data)
    assert stripped.startswith(b"\x7fELF") and not stripped.endswith(kmod.SIGNATURE_MAGIC)
    assert kmod.SIGNATURE_MAGIC not in stripped
    assert 256 < len(data) - len(stripped) < 4096  # a signature, not a chunk of code
    (tmp_path / "crc16.ko").write_bytes(stripped)
    proc = subprocess.run(["readelf", "-S", "-W", str(tmp_path / "crc16.ko")],
                          capture_output=True)
    assert proc.returncode == 0 and b".modinfo" in proc.stdout
    assert kmod.strip_signature(stripped) == stripped

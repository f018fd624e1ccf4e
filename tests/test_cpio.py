"""The newc writer, read back by independent tools (bsdtar and GNU cpio)."""

from __future__ import annotations

import subprocess

from hshelper import cpio


def sample():
    return [
        cpio.directory("/bin"),
        cpio.regular("/bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.symlink("/bin/sh", "busybox"),
        cpio.chardev("/dev/console", 5, 1),
        cpio.blockdev("/dev/vda", 254, 0, 0o660),
        cpio.directory("/dev"),
        cpio.regular("/odd", b"x" * 5),  # data needing padding
    ]


def test_bsdtar_lists_everything_with_types(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.write_archive(sample()))
    out = subprocess.run(["bsdtar", "--numeric-owner", "-tvf", str(archive)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line
               for line in out}
    assert set(by_name) == {"bin", "bin/hello", "bin/sh", "dev", "dev/console", "dev/vda", "odd"}
    assert by_name["dev/console"].startswith("crw-------")
    assert by_name["dev/vda"].startswith("brw-rw----")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("busybox")
    assert by_name["bin/hello"].split()[2:4] == ["0", "0"]  # owner and group: root


def test_gnu_cpio_extracts_contents(tmp_path):
    archive = cpio.write_archive(sample())
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching",
                    "dev/*"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "bin/sh").is_symlink()


def test_deterministic_and_order_independent():
    entries = sample()
    assert cpio.write_archive(entries) == cpio.write_archive(list(reversed(entries)))
    assert cpio.write_archive(entries, mtime=1) != cpio.write_archive(entries, mtime=2)


def test_header_layout():
    head = cpio.header("ab", 0o100644, 3, 7, 1, 0)
    assert head.startswith(b"070701") and len(head) % 4 == 0
    assert head[6:14] == b"00000007"  # ino
    assert head[94:102] == b"00000003"  # namesize "ab\0"


def test_duplicate_names_rejected():
    import pytest

    with pytest.raises(ValueError):
        cpio.write_archive([cpio.directory("/a"), cpio.directory("a")])

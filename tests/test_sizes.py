"""hshelper.sizes.parse_size: the one size parser behind --disk size=, --memory, --mem
and the size config keys (pure; the values are qemu's and truncate's reading)."""

from __future__ import annotations

import pytest

from hshelper.errors import HshelperError
from hshelper.sizes import KIB, MIB, parse_size


@pytest.mark.parametrize("text,size", [
    ("512", 512), ("1K", 1024), ("1k", 1024), ("4KiB", 4096), ("4KB", 4096),
    ("1M", 1048576), ("2G", 2147483648), ("1T", 1099511627776), ("1.5K", 1536),
    ("10B", 10), ("3 M", 3145728), (" 7 ", 7), ("0", 0),
])
def test_bytes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text,mib", [
    ("512", 512), ("768M", 768), ("1G", 1024), ("1.5G", 1536), ("262144K", 256),
    ("2GiB", 2048), ("1T", 1048576),
])
def test_mib_as_qemu_m_reads_a_bare_number(text, mib):
    assert parse_size(text, default_unit=MIB, unit=MIB) == mib


def test_kib():
    assert parse_size("2M", default_unit=KIB, unit=KIB) == 2048
    assert parse_size("100", default_unit=KIB, unit=KIB) == 100


@pytest.mark.parametrize("text,unit", [
    ("", 1), ("abc", 1), ("-1", 1), ("1X", 1), ("1.5", 1), ("G", 1), ("1..5G", 1),
    ("1.5K", MIB), ("1000K", MIB), ("0.1K", 1),
])
def test_refused_with_exit_2(text, unit):
    with pytest.raises(HshelperError) as info:
        parse_size(text, default_unit=unit, unit=unit)
    assert info.value.status == 2 and "\n" not in str(info.value)

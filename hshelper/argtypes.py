"""Checked values of command-line options, for argparse's ``type=``.

A bad value is a usage error: one line naming the option, exit 2, raised while the
command line is parsed, so nothing has started and no file was made yet.
"""

from __future__ import annotations

import math
from typing import Callable

from hshelper.errors import EXIT_USAGE, HshelperError
from hshelper.sizes import MIB, parse_size

MIN_MEMORY_MIB = 96  # below this the helper kernel does not boot


def positive_int(option: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            raise HshelperError(f"{option} {text}: expected a whole number of 1 or more",
                                status=EXIT_USAGE)
        return int(text)
    return convert


def positive_seconds(option: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise HshelperError(f"{option} {text}: expected a number of seconds greater "
                                "than 0", status=EXIT_USAGE)
        return value
    return convert


def memory_mib(option: str, text: str) -> int:
    """A guest memory size in MiB: ``512`` (MiB, as qemu's -m), ``768M``, ``1.5G``."""
    try:
        mib = parse_size(text, default_unit=MIB, unit=MIB)
    except HshelperError as exc:
        raise HshelperError(f"{option} {text}: {exc}", status=EXIT_USAGE) from None
    if mib < MIN_MEMORY_MIB:
        raise HshelperError(f"{option} {text}: the helper VM needs at least "
                            f"{MIN_MEMORY_MIB} MiB", status=EXIT_USAGE)
    return mib


def memory(option: str) -> Callable[[str], int]:
    return lambda text: memory_mib(option, text)


def qemu_program(text: str) -> str:
    """``--qemu PROG``. vm-run's ``--qemu='-rtc ...'`` (extra qemu options) would land
    here as a program name and fail as "not found" after the image is built."""
    if text.startswith("-") or not text.strip():
        raise HshelperError(f"--qemu {text!r}: names the qemu program here; extra qemu "
                            "options (vm-run's --qemu='OPTIONS') are not taken",
                            status=EXIT_USAGE)
    return text

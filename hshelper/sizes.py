"""Sizes as people write them: ``512``, ``768M``, ``1.5G``, ``2GiB``, ``262144K``.

One parser for every size hshelper reads: ``--disk size=``, ``--memory``, vm-run's
``--mem`` and the config keys that are sizes (``[run] memory = "1G"``). K, M, G and T
are powers of 1024, as qemu, truncate and mkfs read them; a trailing ``B`` or ``iB`` is
allowed and changes nothing. A bare number is in the caller's default unit: bytes for
a disk, MiB for memory (as qemu's ``-m`` reads it).
"""

from __future__ import annotations

import re

from hshelper.errors import HshelperError

KIB = 2**10
MIB = 2**20
UNITS = {"b": 1, "k": KIB, "m": MIB, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?")
UNIT_NAMES = {1: "bytes", KIB: "KiB", MIB: "MiB"}


def parse_size(text: str, default_unit: int = 1, unit: int = 1) -> int:
    """``text`` as a whole number of ``unit`` (bytes by default); a number without a
    suffix is in ``default_unit``. Raises HshelperError (exit 2) for anything else:
    no number, an unknown suffix, a negative size, or a size that is not a whole number
    of ``unit`` (``1.5K`` of bytes is fine, of MiB it is not)."""
    match = _SIZE.fullmatch(str(text).strip().lower())
    if not match:
        raise HshelperError(f"bad size {text!r}: use a number with an optional K, M, G or T "
                            "(powers of 1024)", status=2)
    # Exact integer arithmetic: "1.5" is 15/10 (decimal's import cost 1.6 ms a run).
    whole, _, fraction = match.group(1).partition(".")
    numerator, denominator = int(whole + fraction), 10 ** len(fraction)
    factor = UNITS[match.group(2)] if match.group(2) else default_unit
    size, rest = divmod(numerator * factor, denominator * unit)
    if rest:
        raise HshelperError(f"bad size {text!r}: not a whole number of "
                            f"{UNIT_NAMES.get(unit, f'{unit}-byte units')}", status=2)
    return size

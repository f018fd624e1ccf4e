"""Choose the accelerator: KVM when it really works, TCG otherwise, and say why.

The mere presence of /dev/kvm proves nothing (a broken KVM hangs the guest forever), so
``auto`` and ``kvm`` run a tiny probe guest under KVM with a short timeout
(hshelper.accel). The answer is cached for the current boot of the machine. Config:
``accel.probe_timeout`` (seconds).
"""

from __future__ import annotations

import json
import os
import time

from hshelper.config import Key
from hshelper.errors import HshelperError
from hshelper.hookspecs import hookimpl
from hshelper.initrd import cache_root
from hshelper.model import Accel

# Without a boot id (no /proc in the chroot), trust a cached answer this long.
UNKNOWN_BOOT_TTL = 3600


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def cached_probe(qemu: str, timeout: float, cache_file) -> tuple[bool, str]:
    """(usable, reason), from the cache when this boot already probed this qemu."""
    ident = {"boot": boot_id(), "qemu": qemu, "kvm": _kvm_ident()}
    try:
        saved = json.loads(cache_file.read_text())
        fresh = ident["boot"] is not None or time.time() - saved["time"] < UNKNOWN_BOOT_TTL
        if saved["ident"] == ident and fresh:
            return saved["usable"], saved["reason"] + " (cached for this boot)"
    except (OSError, ValueError, KeyError):
        pass
    from hshelper import accel as probe  # only a run that probes pays for the import

    result = probe.probe_kvm(qemu, timeout=timeout)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ident": ident, "time": time.time(),
                                   "usable": result.usable, "reason": result.reason}))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return result.usable, result.reason


def _kvm_ident() -> list[int] | None:
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    return [st.st_rdev, st.st_mode, st.st_uid, st.st_gid]


@hookimpl
def hshelper_config_keys():
    return [Key("accel", "probe_timeout", float, 3.0,
                "seconds the KVM probe guest may take before KVM counts as broken")]


@hookimpl(trylast=True)
def hshelper_choose_accel(spec, qemu, config):
    if spec.accel == "tcg":
        return Accel("tcg", "asked for TCG")
    usable, reason = cached_probe(qemu, config.get("accel", "probe_timeout"),
                                  cache_root(config) / "probe" / "kvm.json")
    if usable:
        return Accel("kvm", reason)
    if spec.accel == "kvm":
        raise HshelperError(f"KVM was asked for but does not work: {reason}")
    return Accel("tcg", reason)

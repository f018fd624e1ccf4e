"""Choose the accelerator: KVM when it really works, TCG otherwise, and say why.

The mere presence of /dev/kvm proves nothing (a broken KVM hangs the guest forever), so
``auto`` and ``kvm`` run a tiny probe guest under KVM with a short timeout
(hshelper.qemu.probe, the machine table says which probe). The answer is cached for the
current boot of the machine. Config: ``accel.probe_timeout`` (seconds).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from hshelper import cache
from hshelper.config import Key
from hshelper.errors import HshelperError
from hshelper.hookspecs import hookimpl
from hshelper.model import Accel
from hshelper.qemu import probe

# Without a boot id (no /proc in the chroot), trust a cached answer this long.
UNKNOWN_BOOT_TTL = 3600


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _cached(cache_file: Path, ident: dict) -> tuple[bool, str] | None:
    try:
        saved = cache.read_json(cache_file, "KVM probe answer")
        if saved is None:
            return None
        fresh = ident["boot"] is not None or time.time() - saved["time"] < UNKNOWN_BOOT_TTL
        if saved["ident"] == ident and fresh:
            return saved["usable"], saved["reason"] + " (cached for this boot)"
    except (OSError, ValueError, KeyError):
        pass
    return None


@contextlib.contextmanager
def probe_lock(path: Path, bound: float):
    """Hold ``path`` locked while probing, so that parallel runs (make -j, several
    recipe steps at once) wait for one probe instead of each booting a probe guest.
    Waits at most ``bound`` seconds: a stuck peer must not stop this run, which then
    probes by itself."""
    import tenacity  # only a run that probes pays for the import

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        take = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(BlockingIOError),
            wait=tenacity.wait_fixed(0.05), stop=tenacity.stop_after_delay(bound),
            reraise=True)
        with contextlib.suppress(BlockingIOError):
            take(fcntl.flock, fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def cached_probe(qemu: str, machine, kernel: Path, timeout: float,
                 cache_file: Path) -> tuple[bool, str]:
    """(usable, reason), from the cache when this boot already probed this qemu."""
    ident = {"boot": boot_id(), "qemu": qemu, "kvm": _kvm_ident(), "arch": machine.arch}
    early = probe.same_architecture(machine)
    if early:
        return False, early
    hit = _cached(cache_file, ident)
    if hit is not None:
        return hit
    with probe_lock(cache_file.with_suffix(".lock"), timeout + 2):
        hit = _cached(cache_file, ident)  # a peer probed while we waited
        if hit is not None:
            return hit
        result = probe.probe_kvm(qemu, machine, kernel, timeout=timeout)
        with contextlib.suppress(OSError):
            cache.write_json(cache_file, {"ident": ident, "time": time.time(),
                                          "usable": result.usable, "reason": result.reason})
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
                "seconds the KVM probe guest may take before KVM counts as broken",
                minimum=0.1)]


@hookimpl(trylast=True)
def hshelper_choose_accel(spec, qemu, config, machine, kernel):
    if spec.accel == "tcg":
        return Accel("tcg", "asked for TCG")
    cache_file = cache.subdir(config, "probe") / f"kvm-{machine.arch}.json"
    usable, reason = cached_probe(qemu, machine, kernel, config.get("accel", "probe_timeout"),
                                  cache_file)
    if usable:
        return Accel("kvm", reason)
    if spec.accel == "kvm":
        raise HshelperError(f"KVM was asked for but does not work: {reason}")
    return Accel("tcg", reason)

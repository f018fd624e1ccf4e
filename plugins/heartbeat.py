"""A heartbeat line on stderr while the command is silent.

Build-root tools kill jobs that print nothing for a while (hasher's idle-output limit),
and a long mkfs under TCG can be quiet for minutes. Every ``heartbeat.interval`` seconds
of silence this prints one line to stderr. Off with ``--quiet`` or interval = 0.
"""

from __future__ import annotations

import sys
import threading
import time

from hshelper.config import Key
from hshelper.hookspecs import hookimpl


@hookimpl
def hshelper_config_keys():
    return [Key("heartbeat", "interval", float, 60.0,
                "seconds of silence before a 'still running' line on stderr; 0: never",
                minimum=0)]


_interval = [60.0]


@hookimpl
def hshelper_configure(config):
    _interval[0] = config.get("heartbeat", "interval")


def _beat(vm, interval: float, name: str) -> None:
    activity = vm.activity
    while not activity.finished.wait(min(interval, 1.0)):
        now = time.monotonic()
        if now - activity.last_output >= interval:
            print(f"hshelper: {name} still running ({now - activity.started:.0f} s)",
                  file=sys.stderr, flush=True)
            activity.last_output = now


@hookimpl(hookwrapper=True)
def hshelper_run_vm(spec, vm):
    interval = _interval[0]
    if interval > 0 and not spec.extra.get("quiet"):
        threading.Thread(target=_beat, args=(vm, interval, spec.argv[0]), daemon=True).start()
    yield

"""Loop devices in the guest: the loop module and losetup, so recipes written for
``losetup -fP --show file.img`` work unchanged (partitions appear as loopNpM).
No config keys."""

from __future__ import annotations

from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Program


@hookimpl
def hshelper_image_contents():
    return Contents(modules=("loop",), programs=(Program("losetup", applet=False),))

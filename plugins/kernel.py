"""Find the kernel in the standard layouts (the default answer to hshelper_find_kernel).

/boot/vmlinuz-VERSION (ALT, Debian), /lib/modules/VERSION/vmlinuz and the usr-merged
/usr/lib/modules/VERSION/vmlinuz (Fedora, Arch). It answers last, so a plugin for an
unusual layout only needs to answer when it recognises its own. Config: image.kernel.
"""

from __future__ import annotations

from hshelper.hookspecs import hookimpl


@hookimpl(trylast=True)
def hshelper_find_kernel(sysroot, version):
    return sysroot.kernel(version)

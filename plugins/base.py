"""The base guest: init, shell, mount, insmod, device nodes and the base module list.

Contributes /init (hshelper/guest/init), the on-demand module loader
(hshelper/guest/modprobe), the RNG reseed program on machines without vmgenid
(hshelper/reseed.py), the programs the init itself runs, the everyday
utilities a recipe script expects (busybox applets where busybox is installed, coreutils
and friends otherwise), /dev/console and /dev/null in the archive, and the modules of
kernel-modules.lst plus image.module_lists and image.modules. Config: image.programs.
"""

from __future__ import annotations

from pathlib import Path

from hshelper import guest, kmod, reseed
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Device, File, Program
from hshelper.qemu import machines

# What the init runs; one busybox binary beats shell + util-linux + kmod for size.
INIT_PROGRAMS = ("sh", "mount", "insmod", "env", "mkdir", "ln", "sleep", "sync", "mknod",
                 "head")
REAL_PROGRAMS = ("mount", "umount")
# What recipe scripts commonly call; each only when installed (as busybox applets when
# busybox is installed).
UTILITIES = (
    "cat", "cp", "mv", "rm", "ln", "ls", "chmod", "chown", "dd", "truncate", "touch",
    "echo", "printf", "head", "tail", "sed", "grep", "awk", "find", "xargs", "stat",
    "du", "df", "mktemp", "basename", "dirname", "readlink", "realpath", "true", "false",
    "test", "[", "tr", "cut", "sort", "uniq", "wc", "tee", "id", "uname", "date",
    "umount", "rmdir", "seq", "sha256sum", "md5sum", "cmp", "diff", "gzip", "zcat",
    "dmesg", "bash", "expr", "install", "od", "hexdump", "blockdev", "mountpoint",
)
DIRECTORIES = ("/proc", "/sys", "/dev", "/tmp", "/run", "/mnt", "/root", "/etc", "/hshelper")


def base_modules(config, machine) -> tuple[str, ...]:
    """Module names (kernel-modules.lst syntax): the machine's boot modules (its virtio
    transport, its panic notifier), the base list and the config's."""
    text = (guest.DIR.parent / "kernel-modules.lst").read_text()
    wanted = kmod.parse_list("\n".join(machines.boot_modules(machine)), machine.arch)
    wanted += kmod.parse_list(text, "kernel-modules.lst")
    for extra in config.get("image", "module_lists"):
        wanted += kmod.read_list(Path(extra))
    names = [w.spec() for w in wanted]
    return tuple(names + list(config.get("image", "modules")))


@hookimpl
def hshelper_image_contents(config, machine):
    init = guest.read("init")
    modprobe = guest.read("modprobe")
    # util-linux mount where installed: busybox's cannot detect a filesystem's type, and
    # `mount /dev/vda2 /mnt` is what recipes write. /bin/sh is the build root's own (it
    # runs the init and every #!/bin/sh script), busybox's only where it is the shell.
    programs = [Program(p, required=p in ("sh", "mount", "insmod", "env"),
                        applet=p != "sh", prefer_applet=p not in REAL_PROGRAMS + ("sh",),
                        essential=True)
                for p in INIT_PROGRAMS]
    # Busybox's applets for the everyday utilities keep the image small (GNU coreutils,
    # grep, sed, findutils weigh 5 MB with their libraries); roots without busybox get
    # the real ones, and --with NAME / image.programs insists on the real program.
    # Everyday utilities are essential (a root without busybox pays for awk's libm);
    # bash is not: 1.3 MB, and a script's #! line brings it when it is needed.
    programs += [Program(p, prefer_applet=p not in REAL_PROGRAMS, essential=p != "bash")
                 for p in UTILITIES]
    programs += [Program(p, required=True, applet=False) for p in config.get("image", "programs")]
    files = [File("/init", data=init, mode=0o755),
             File("/hshelper/modprobe", data=modprobe, mode=0o755)]
    if not machine.vmgenid and reseed.supported(machine.arch):
        # A restored guest of this machine reseeds its RNG itself (no vmgenid here).
        files.append(File(reseed.GUEST_PATH, data=reseed.program(machine.arch), mode=0o755))
    return Contents(
        modules=base_modules(config, machine),
        programs=tuple(programs),
        files=tuple(files),
        directories=DIRECTORIES,
        devices=(Device("/dev/console", "c", 5, 1), Device("/dev/null", "c", 1, 3, 0o666)),
    )

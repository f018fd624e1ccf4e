"""The base guest: init, shell, mount, insmod, device nodes and the base module list.

Contributes /init (hshelper/guest/init), the programs the init itself runs, the everyday
utilities a recipe script expects (busybox applets where busybox is installed, coreutils
and friends otherwise), /dev/console and /dev/null in the archive, and the modules of
kernel-modules.lst plus image.module_lists and image.modules. Config: image.programs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hshelper import kmod
from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, Device, File, Program

# What the init runs; one busybox binary beats shell + util-linux + kmod for size.
INIT_PROGRAMS = ("sh", "mount", "insmod", "env", "mkdir", "ln", "sleep", "sync")
# What recipe scripts commonly call; each only when installed.
UTILITIES = (
    "cat", "cp", "mv", "rm", "ln", "ls", "chmod", "chown", "dd", "truncate", "touch",
    "echo", "printf", "head", "tail", "sed", "grep", "awk", "find", "xargs", "stat",
    "du", "df", "mktemp", "basename", "dirname", "readlink", "realpath", "true", "false",
    "test", "[", "tr", "cut", "sort", "uniq", "wc", "tee", "id", "uname", "date",
    "umount", "rmdir", "seq", "sha256sum", "md5sum", "cmp", "diff", "gzip", "zcat",
    "dmesg", "bash", "expr", "install", "od", "hexdump", "blockdev", "mountpoint",
)
DIRECTORIES = ("/proc", "/sys", "/dev", "/tmp", "/run", "/mnt", "/root", "/etc", "/hshelper")


def base_modules(config) -> tuple[str, ...]:
    """Module names (kernel-modules.lst syntax) from the base list and the config."""
    text = resources.files("hshelper").joinpath("kernel-modules.lst").read_text()
    wanted = kmod.parse_list(text, "kernel-modules.lst")
    for extra in config.get("image", "module_lists"):
        wanted += kmod.read_list(Path(extra))
    names = [w.name + ("?" if w.optional else "") for w in wanted]
    return tuple(names + list(config.get("image", "modules")))


@hookimpl
def hshelper_image_contents(config):
    init = resources.files("hshelper.guest").joinpath("init").read_bytes()
    programs = [Program(p, required=p in ("sh", "mount", "insmod", "env"), prefer_applet=True)
                for p in INIT_PROGRAMS]
    programs += [Program(p) for p in UTILITIES]
    programs += [Program(p, required=True) for p in config.get("image", "programs")]
    return Contents(
        modules=base_modules(config),
        programs=tuple(programs),
        files=(File("/init", data=init, mode=0o755),),
        directories=DIRECTORIES,
        devices=(Device("/dev/console", "c", 5, 1), Device("/dev/null", "c", 1, 3, 0o666)),
    )

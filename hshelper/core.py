"""The core's own hook answers (the always-loaded "core" plugin): its config keys and
the VM run that plugins wrap."""

from __future__ import annotations

from hshelper.config import Key
from hshelper.hookspecs import hookimpl
from hshelper.sizes import KIB, MIB

# No lz4: the kernel's decoder of the legacy lz4 frame fails when another archive
# follows it, and every run appends one (initrd.COMPRESSION_ORDER says the same).
COMPRESSIONS = ("auto", "zstd", "gzip", "xz", "none")


@hookimpl
def hshelper_config_keys() -> list[Key]:
    return [
        Key("image", "kernel", str, "", "kernel version to use; empty: the newest installed"),
        Key("image", "module_lists", list, [],
            "extra kernel-modules.lst files (same format) whose modules join the image"),
        Key("image", "modules", list, [], "extra kernel modules ('name' or 'name?')"),
        Key("image", "programs", list, [], "extra programs for the image (names or paths)"),
        Key("image", "program_budget_kb", int, 1024,
            "leave out an optional program whose own files and libraries weigh more "
            "(KiB, or a size such as \"2M\"; 0: no limit); --with NAME always adds it",
            unit=KIB, minimum=0),
        Key("image", "compression", str, "auto",
            "initrd compression; auto: the fastest the kernel can unpack", COMPRESSIONS),
        Key("image", "cache_dir", str, "",
            "where built images are kept; empty: $XDG_CACHE_HOME/hshelper"),
        Key("run", "memory", int, 0, "guest memory, as --memory takes it: 512 (MiB), "
            "\"768M\", \"1G\"; 0: 512 MiB, less under a low RLIMIT_AS", unit=MIB, minimum=0),
        Key("run", "cpus", int, 0, "guest CPUs; 0: 1 under TCG, up to 2 under KVM", minimum=0),
        Key("run", "timeout", float, 0.0,
            "seconds before the command is stopped (exit 124); 0: no limit", minimum=0),
        # Without ERMS/FSRM, the guest kernel and glibc copy memory with vector loops
        # instead of `rep movsb`, which TCG emulates slowly: boots 0.4 s sooner, copies
        # in the guest nearly twice as fast (measured A/B on the CI machine).
        Key("run", "tcg_cpu", str, "max,erms=off,fsrm=off",
            "qemu's -cpu under TCG (an older qemu without these flags: max)"),
        Key("run", "qemu", str, "", "the qemu program; empty: qemu-system-ARCH from PATH"),
        Key("run", "mode", str, "image",
            "image: programs from the helper image; root: the build root is the guest's /",
            ("image", "root")),
        Key("plugins", "disable", list, [], "built-in or installed plugins to turn off"),
        Key("plugins", "load", list, [], "local plugin files (Python) to load"),
    ]


@hookimpl(trylast=True)
def hshelper_run_vm(vm, stop, timeout):
    """Start qemu and stream its channels until it ends."""
    vm.start()
    return vm.wait(timeout, stop)

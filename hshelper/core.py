"""The core's own hook answers (the always-loaded "core" plugin): its config keys, the
guest's machine (the build root's architecture), and the VM run that plugins wrap."""

from __future__ import annotations

from hshelper.config import Key
from hshelper.errors import HshelperError
from hshelper.hookspecs import hookimpl
from hshelper.qemu import machines
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
            "seconds the command may run before it is stopped (exit 124); 0: no limit",
            minimum=0),
        Key("run", "boot_timeout", float, 300.0,
            "seconds the VM may take to boot and start the command (exit 125); 0: no limit",
            minimum=0),
        Key("run", "saved_states", bool, True,
            "start from a saved VM state instead of booting, where the machine allows it "
            "(the first run of a machine saves it)"),
        Key("run", "tcg_cpu", str, "",
            "qemu's -cpu under TCG; empty: the machine table's choice for the guest's "
            "architecture (hshelper info shows it)"),
        Key("run", "qemu", str, "", "the qemu program; empty: qemu-system-ARCH from PATH"),
        Key("run", "mode", str, "image",
            "image: the helper image over the build root (every installed tool); root: the "
            "build root alone; isolated: the helper image alone", ("image", "root", "isolated")),
        Key("plugins", "disable", list, [], "built-in or installed plugins to turn off"),
        Key("plugins", "load", list, [], "local plugin files (Python) to load"),
    ]


@hookimpl(trylast=True)
def hshelper_machine(sysroot, kernel):
    """The build root's architecture: its kernel's (a module's ELF header), else its
    programs'."""
    found = sysroot.kernel_arch(kernel) or sysroot.binary_arch()
    if found is None:
        host = machines.host()
        return machines.Choice(host, "no ELF program found in the build root: the host's")
    (e_machine, elf_class, little), witness = found
    machine = machines.from_elf(e_machine, elf_class, little)
    if machine is None:
        raise HshelperError(f"{witness} in the build root is for ELF machine {e_machine} "
                            f"({elf_class}-bit), which hshelper has no helper VM for",
                            hint="known: " + ", ".join(machines.MACHINES))
    return machines.Choice(machine, f"{witness} is an ELF {machine.arch} file")


@hookimpl(trylast=True)
def hshelper_run_vm(vm, stop, limits, script):
    """Start qemu and serve its channels until it ends."""
    vm.start()
    return vm.run(script, limits, stop)

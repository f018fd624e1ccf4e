"""The run stage: ``helper-run CMD`` / ``hshelper run`` / ``hshelper shell``.

Finds the kernel and the guest's machine, chooses the accelerator, builds (or finds)
the image, turns the options into a RunSpec, lets the plugins add shares, disks, kernel
parameters and guest steps, boots the VM, sends it the run script once it is ready, and
returns the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hshelper import argtypes, cache, elf, guestrun, initrd, packages, reseed
from hshelper.config import Layer
from hshelper.errors import HshelperError
from hshelper.model import Accel, ImageResult, RunResult, RunSpec
from hshelper.qemu import kernelimage, savedstate
from hshelper.qemu.argv import BootSpec
from hshelper.qemu.kernelimage import BootKernel
from hshelper.qemu.machines import Choice, Machine
from hshelper.qemu.vm import VM, Limits, RestoreFailed, StopRequest
from hshelper.sysroot import Kernel, Sysroot

BASE_CMDLINE = (
    "panic=-1",  # reboot at once on a panic; -no-reboot turns that into qemu's exit
    "quiet", "loglevel=3",  # the serial console is slow under TCG
    "rdinit=/init",
    "random.trust_cpu=on",  # RDRAND seeds the RNG at once: no virtio-rng device needed
    "cryptomgr.notests",  # crypto self-tests at every algorithm registration cost seconds
    "mitigations=off",  # a throwaway VM running the caller's own command
    # The same addresses in every process: under TCG, translated code is found again by
    # virtual address, so each start of a dynamically linked program costs ~5 ms
    # instead of ~20 (it re-translated ld.so and libc at new addresses every time).
    "norandmaps",
)
LOG_KEEP = 10


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    # --mem and --cpu (vm-run's spellings, with sizes and "max") belong to plugin vmrun.
    parser.add_argument("--memory", type=argtypes.memory("--memory"), metavar="SIZE",
                        help="guest memory: 512 (MiB), 768M, 1.5G (default: 512 MiB, less "
                             "under a low RLIMIT_AS)")
    parser.add_argument("--cpus", type=argtypes.positive_int("--cpus"), metavar="N",
                        help="guest CPUs (default: 1 under TCG, up to 2 under KVM)")
    parser.add_argument("--timeout", type=argtypes.positive_seconds("--timeout"),
                        metavar="SECONDS",
                        help="stop the command after it ran this long (exit 124); the "
                             "boot has its own limit (run.boot_timeout)")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                        help="accelerator: auto probes KVM for real and falls back to TCG")
    parser.add_argument("--skip-without-kvm", action="store_true",
                        help="when KVM does not work, skip the command: warn and exit 0")
    parser.add_argument("--mode", choices=("image", "root", "isolated"),
                        help="image: the helper image's programs; root: the build root is "
                             "the guest's / (read-only), every installed tool is there")
    parser.add_argument("--qemu", type=argtypes.qemu_program, metavar="PROG",
                        help="the qemu program (default: qemu-system-ARCH from PATH)")
    parser.add_argument("--no-stdin", action="store_true",
                        help="do not forward stdin even when it is not a terminal")
    parser.add_argument("--append", metavar="WORDS", action="append", default=[],
                        help="extra kernel command-line words")
    parser.add_argument("-q", "--quiet", action="store_true", help="no heartbeat lines")
    if command == "run":
        parser.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]",
                            help="the command; a single argument with shell syntax is "
                                 "command text for sh")


def default_memory() -> int:
    """512 MiB, or what fits under RLIMIT_AS (qemu maps guest RAM plus ~300 MiB)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    memory = 512
    if soft != resource.RLIM_INFINITY:
        memory = min(memory, soft // 2**20 - 400)
        if memory < 96:
            raise HshelperError(f"RLIMIT_AS ({soft // 2**20} MiB) leaves no room for the VM",
                                hint="raise it (ulimit -v) or set --memory explicitly")
    return memory


def find_qemu(configured: str, machine: Machine, sysroot: Sysroot) -> str:
    """The qemu program for the guest's machine: the build root's own (inside it, that
    is the one on PATH; with --sysroot, the host's)."""
    name = configured or machine.qemu
    path = shutil.which(name)
    if path is None:
        ids = [sysroot.os_release.get("ID", "")] + sysroot.os_release.get("ID_LIKE", "").split()
        package = next((machine.qemu_packages[i] for i in ids if i in machine.qemu_packages),
                       None)
        hint = (f"install {package}" if package else
                "install the qemu system emulator for " + machine.arch)
        raise HshelperError(f"{name} not found on PATH (the guest is {machine.arch})",
                            hint=hint)
    return path


def log_path(config) -> Path:
    logs = cache.subdir(config, "logs")
    old = sorted(logs.glob("console-*.log"))
    for stale in old[:-LOG_KEEP]:
        with contextlib.suppress(OSError):
            stale.unlink()
    return logs / f"console-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def make_spec(args, config, shell: bool) -> RunSpec:
    argv = tuple(args.command[1:] if args.command[:1] == ["--"] else args.command) \
        if not shell else ("sh", "-i")
    if not argv:
        # A plugin's option may imply the command (vm-run's --heredoc: sh reads stdin).
        argv = tuple(getattr(args, "implied_command", None) or ())
    if not argv:
        raise HshelperError("no command given: helper-run CMD [ARGS...]", status=2)
    memory = config.get("run", "memory") or default_memory()
    env = dict(os.environ)
    if shell:
        # The shell reads the terminal line by line (the host's tty stays in its own
        # line mode: editing happens there, Ctrl-D ends the shell, Ctrl-C stops the VM).
        stdin = True
        env["PS1"] = "hshelper-vm# "
    else:
        stdin = not args.no_stdin and not sys.stdin.isatty()
    return RunSpec(
        argv=argv, cwd=os.getcwd(), env=tuple(sorted(env.items())),
        memory_mb=memory, cpus=config.get("run", "cpus"),
        timeout=config.get("run", "timeout") or None,
        accel=args.accel or "auto", stdin=stdin, verbose=args.verbose, interactive=shell,
        extra={"append": " ".join(args.append), "quiet": "1" if args.quiet else ""})


# Shells are self-contained ELF programs, so a script's shell can join the image; an
# interpreter with a library tree of its own (python3, perl) needs --mode root.
SCRIPT_SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh"})


def script_shell(cwd: str, command: str, search_path: str) -> str | None:
    """The shell named by the ``#!`` line of ``command`` when it is a script in one of
    SCRIPT_SHELLS other than sh (always in the image), else None. ``command`` is found
    as the guest's init finds it: a path, a name on ``search_path``, or a file in cwd."""
    candidates = [os.path.join(cwd, command)] if "/" in command else [
        *(os.path.join(d, command) for d in search_path.split(":") if d),
        os.path.join(cwd, command)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            try:
                with open(candidate, "rb") as fh:
                    head = fh.read(256)
            except OSError:
                return None
            break
    else:
        return None
    words = elf.shebang_words(head)
    if words and os.path.basename(words[0]) == "env":
        words = words[1:]
    if not words or os.path.basename(words[0]) not in SCRIPT_SHELLS - {"sh"}:
        return None
    return words[0] if words[0].startswith("/") else os.path.basename(words[0])


def _signal_handlers(stop: StopRequest):
    def handler(signum, frame):
        stop.request(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM,
                                                  signal.SIGHUP)}
    return old


def chain_run_spec(host, spec: RunSpec, config, args, image, machine) -> RunSpec:
    """Let each plugin adjust the spec, seeing the previous result: in pluggy's call
    order (tryfirst ones, then last registered first: ``mkimage`` sees the disks and
    the recipe)."""
    for impl in reversed(host.pm.hook.hshelper_run_spec.get_hookimpls()):
        kwargs = {"spec": spec, "config": config, "args": args, "image": image,
                  "machine": machine}
        changed = impl.function(**{k: kwargs[k] for k in impl.argnames})
        if changed is not None:
            spec = changed
    return spec


def find_command(spec: RunSpec, sysroot: Sysroot) -> RunSpec:
    """Look the command up where the guest will, before any VM starts: on its PATH in the
    build root, else as a file in the working directory (``helper-run mkimage.sh``
    means the script here), else among busybox's stand-ins. Not found is exit 127 at
    once, with the package to install."""
    name = spec.argv[0]
    if "/" in name or spec.interactive or spec.mode == "isolated":
        return spec  # a path, or the image alone: the guest itself reports
    path = tuple(dict(guestrun.guest_env(spec.env))["PATH"].split(":"))
    if sysroot.which(name, path):
        return spec
    if os.path.isfile(os.path.join(spec.cwd, name)):
        return dataclasses.replace(spec, argv=(f"./{name}", *spec.argv[1:]))
    if spec.mode == "image" and name in sysroot.applets:
        return spec  # busybox's applet stands in
    where = "" if str(sysroot.root) == "/" else f" {sysroot.root}"
    raise HshelperError(f"{name}: command not found in the build root{where}", status=127,
                        hint=packages.install_hint(name, sysroot.os_release))


def restores_unsafe(machine: Machine, kernel_version: str,
                    kconfig: dict[str, str]) -> str | None:
    """Why saved states are never used for this machine and kernel, or None: a machine
    whose restored guests do not run right (Machine.restore_fault), or restores that
    would share one RNG state (x86 relies on vmgenid in the kernel, the other machines on
    hshelper.reseed's program and RNDRESEEDCRNG)."""
    if machine.restore_fault:
        return f"a restored {machine.arch} guest {machine.restore_fault}"
    if machine.vmgenid:
        if kconfig and kconfig.get("CONFIG_VMGENID") != "y":
            return "the kernel has no CONFIG_VMGENID"
        return None
    if not reseed.supported(machine.arch):
        return f"hshelper has no RNG reseed program for {machine.arch}"
    if not reseed.kernel_has_it(kernel_version):
        return "the kernel is older than 4.17 (no RNDRESEEDCRNG)"
    return None


def saved_state_dir(config, spec: RunSpec, image, machine: Machine,
                    kconfig: dict[str, str]) -> Path | None:
    """The saved states' directory when this run can use one (its machine then gets the
    fixed shape of share and disk slots), else None: saved states off, a kernel without
    vmgenid on a machine that relies on it, or one without RNDRESEEDCRNG on a machine
    that reseeds by itself (restores would share their RNG state), a kernel with
    virtio_blk built in (its driver would bind the placeholder disks before the save),
    a machine whose restored guests do not run right, or more disks or shares than
    there are slots."""
    if not config.get("run", "saved_states"):
        return None
    if restores_unsafe(machine, image.kernel_version, kconfig):
        return None
    if "virtio_blk" in image.features and "virtio_blk" not in image.modules:
        return None
    shares = [s for s in spec.shares if s.automount]
    if len(spec.disks) > savedstate.DISK_SLOTS or len(shares) > savedstate.SHARE_SLOTS:
        return None
    states = cache.subdir(config, "states")
    savedstate.placeholder(states)
    savedstate.empty_dir(states)
    return states


def run_vm(host, spec: RunSpec, vm: VM, make_vm, state, stop: StopRequest, limits: Limits,
           script: bytes, how: dict):
    """Run the VM through the plugins' hshelper_run_vm: from the saved state when one is
    there (a state that does not load is discarded and the run boots cold), saving one
    at "ready" when there is none. ``how`` learns which it was."""
    def run(this: VM):
        return host.hook.hshelper_run_vm(spec=spec, vm=this, stop=stop, limits=limits,
                                         script=script)

    def note(text: str) -> None:
        if spec.verbose and text:
            print(f"hshelper: {text}", file=sys.stderr, flush=True)

    if state is None:
        return run(vm)
    why = savedstate.usable(state)
    if why is None:
        vm.restore_from = state.path
        try:
            outcome = run(vm)
            note(f"restored the saved VM state in {vm.restore_seconds:.2f} s")
            how.update(how="restored", restore_seconds=vm.restore_seconds)
            return outcome
        except RestoreFailed as exc:
            savedstate.discard(state)
            note(f"the saved VM state did not load ({exc}); it was removed: booting")
            vm = make_vm()
    else:
        note(f"{why}: booting, and saving the state at ready")
    with savedstate.saving(state) as target:
        vm.save_to = target.path
        outcome = run(vm)
        target.keep = vm.saved
        target.crc = vm.state_crc
        how.update(how="saved" if vm.saved else "booted")
        note(vm.state_note or (f"saved the VM state in {vm.save_seconds:.2f} s"
                               if vm.saved else ""))
    return outcome


def kernel_cmdline(machine: Machine, plugin_words: list[list[str] | None],
                   append: str) -> str:
    words = [f"console={machine.console}", *BASE_CMDLINE, *machine.cmdline]
    for extra in plugin_words:
        words += extra or []
    return " ".join(words + append.split())


@dataclass(frozen=True)
class Target:
    """What a run boots: the kernel, the machine of its architecture, the qemu for that
    machine, and the kernel file qemu is given."""

    kernel: Kernel
    choice: Choice
    qemu: str
    boot_kernel: BootKernel

    @property
    def machine(self) -> Machine:
        return self.choice.machine


def boot_kernel_of(sysroot: Sysroot, kernel: Kernel, machine: Machine, config) -> BootKernel:
    """The file qemu boots for ``kernel`` (unpacked and cached where that is faster or
    where qemu cannot load the format)."""
    return kernelimage.bootable(sysroot.resolve(kernel.image).host, machine.kernel_format,
                                cache.subdir(config, "kernels"))


def find_target(host, sysroot: Sysroot, config) -> Target:
    kernel, choice = initrd.find_kernel(host, sysroot, config)
    qemu = find_qemu(config.get("run", "qemu"), choice.machine, sysroot)
    return Target(kernel, choice, qemu, boot_kernel_of(sysroot, kernel, choice.machine, config))


def choose_accel(host, spec: RunSpec, config, target: Target) -> Accel:
    accel = host.hook.hshelper_choose_accel(spec=spec, qemu=target.qemu, config=config,
                                            machine=target.machine,
                                            kernel=target.boot_kernel.path)
    return accel or Accel("tcg", "no plugin chose an accelerator")


def settle_spec(host, spec: RunSpec, config, args, sysroot: Sysroot, target: Target,
                accel: Accel) -> tuple[RunSpec, ImageResult, object]:
    """The run as the plugins shape it, the image it boots (a variant with the script's
    shell when the image is all the command has), and the config that made it."""
    if not spec.cpus:
        spec = dataclasses.replace(spec, cpus=1 if accel.name == "tcg" else
                                   min(2, os.cpu_count() or 1, target.machine.max_cpus))
    image = initrd.build_image(host, sysroot, config)
    spec = chain_run_spec(host, spec, config, args, image, target.machine)
    if not any(s.automount and (spec.cwd == s.guest or spec.cwd.startswith(
            s.guest.rstrip("/") + "/")) for s in spec.shares):
        # Not shared (--no-share-cwd, or no share plugin): the guest starts in /.
        spec = dataclasses.replace(spec, cwd="/")
    spec = find_command(spec, sysroot)
    interpreter = script_shell(spec.cwd, spec.argv[0], os.environ.get("PATH", ""))
    if interpreter and spec.mode == "isolated" and not spec.interactive:
        # `helper-run mkimage.sh` with `#!/bin/bash` and no build root to take bash
        # from: bash joins the image (a cached variant).
        config = config.with_layer(Layer(f"#! line of {spec.argv[0]}", {
            "image.programs": [*config.get("image", "programs"), interpreter]}))
        image = initrd.build_image(host, sysroot, config)
    if "virtio_console" not in image.features:
        raise HshelperError(f"kernel {image.kernel_version} has no virtio_console module, "
                            "which carries the command's output",
                            hint="install a kernel with CONFIG_VIRTIO_CONSOLE")
    return spec, image, config


@dataclass(frozen=True)
class VMPlan:
    """Everything qemu and the guest get for one run."""

    spec: RunSpec
    boot: BootSpec
    devices: list[str]
    script: bytes
    slot_dir: Path | None  # saved VM states apply: where they are


def plan_vm(host, spec: RunSpec, config, image: ImageResult, target: Target,
            accel: Accel, kconfig: dict[str, str]) -> VMPlan:
    machine = target.machine
    cmdline = kernel_cmdline(
        machine, host.hook.hshelper_kernel_cmdline(spec=spec, image=image, accel=accel),
        spec.extra.get("append", ""))
    slot_dir = saved_state_dir(config, spec, image, machine, kconfig)
    if slot_dir:
        spec = dataclasses.replace(spec, slot_dir=str(slot_dir))
    devices: list[str] = []
    for extra in reversed(host.hook.hshelper_qemu_args(spec=spec, image=image, accel=accel,
                                                       machine=machine)):
        devices += extra or []
    if slot_dir and machine.vmgenid:
        # A new generation ID at every restore: the guest kernel reseeds its RNG.
        devices += ["-device", "vmgenid,guid=auto"]
    root_mounts: list[tuple[str, str, str, str]] = []
    for entries in reversed(host.hook.hshelper_root_mounts(spec=spec)):
        root_mounts += entries or []
    steps: list[tuple[str, str]] = []
    for extra in reversed(host.hook.hshelper_guest_setup(spec=spec, image=image,
                                                         machine=machine,
                                                         root_mounts=root_mounts)):
        steps += extra or []
    boot = BootSpec(accel.name, spec.memory_mb, spec.cpus, target.boot_kernel.path,
                    initrd.boot_initrd(image, accel.name), cmdline,
                    config.get("run", "tcg_cpu"))
    return VMPlan(spec, boot, devices, guestrun.run_script(spec, steps), slot_dir)


def main(session, args, config, shell: bool = False) -> int:
    sysroot = Sysroot(args.sysroot)
    host = session.host
    spec = make_spec(args, config, shell)
    target = find_target(host, sysroot, config)
    accel = choose_accel(host, spec, config, target)
    if args.skip_without_kvm and accel.name != "kvm":
        print(f"hshelper: warning: skipping {' '.join(spec.argv)}: no working KVM "
              f"({accel.reason})", file=sys.stderr)
        host.hook.hshelper_after_run(spec=spec, result=RunResult(
            status=0, reason=f"skipped: no working KVM ({accel.reason})", accel=accel,
            seconds=0.0, boot_seconds=None, console_log=None, skipped=True))
        return 0
    if accel.name == "tcg" and spec.accel == "auto" and args.verbose:
        print(f"hshelper: using TCG: {accel.reason}", file=sys.stderr)
    spec, image, config = settle_spec(host, spec, config, args, sysroot, target, accel)
    plan = plan_vm(host, spec, config, image, target, accel,
                   sysroot.kernel_config(target.kernel))
    return boot_and_run(host, plan, target, accel, image, config)


def boot_and_run(host, plan: VMPlan, target: Target, accel: Accel, image: ImageResult,
                 config) -> int:
    """Start the VM (restored where a saved state serves), serve it to its end, report
    and return the exit status."""
    spec = plan.spec
    limits = Limits(boot=config.get("run", "boot_timeout") or None, command=spec.timeout)
    stop = StopRequest()
    old_handlers = _signal_handlers(stop)
    console_log = log_path(config)
    started = time.monotonic()
    started_how: dict = {}  # how run_vm started the VM, for the result
    try:
        def make_vm() -> VM:
            return VM(target.qemu, target.machine, plan.boot, plan.devices, console_log,
                      spec.stdin, spec.verbose,
                      disk_files={d.drive_id(i): str(d.path)
                                  for i, d in enumerate(spec.disks)},
                      on_event=lambda event: host.hook.hshelper_vm_event(spec=spec,
                                                                         event=event))
        vm = make_vm()
        host.hook.hshelper_before_run(spec=spec, argv=vm.argv)
        if spec.verbose:
            print(f"hshelper: qemu: {shlex.join(vm.argv)}", file=sys.stderr, flush=True)
        if spec.interactive and sys.stdin.isatty():
            print("hshelper: a root shell in the helper VM; leave with exit or Ctrl-D "
                  "(Ctrl-C stops the VM)", file=sys.stderr, flush=True)
        state = None
        version = savedstate.qemu_version(target.qemu, plan.slot_dir) if plan.slot_dir else ""
        if plan.slot_dir and savedstate.new_enough(version):
            state = savedstate.entry(plan.slot_dir, savedstate.key(
                version, vm.argv, plan.boot.kernel, plan.boot.initrd, accel.name,
                initrd.code_digest()))
        outcome = run_vm(host, spec, vm, make_vm, state, stop, limits, plan.script,
                         started_how)
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
    if outcome.image_damaged:
        initrd.discard(image)
        print(f"hshelper: the cached helper image {image.initrd.parent} did not boot; it "
              "was removed and the next run builds it again", file=sys.stderr)
    result = RunResult(status=outcome.status, reason=outcome.reason, accel=accel,
                       seconds=time.monotonic() - started, boot_seconds=outcome.boot_seconds,
                       console_log=console_log, start=started_how.get("how", "booted"),
                       restore_seconds=started_how.get("restore_seconds"))
    host.hook.hshelper_after_run(spec=spec, result=result)
    if outcome.reason:
        print(f"hshelper: {outcome.reason} (kernel log: {console_log})", file=sys.stderr)
        if spec.verbose and outcome.console_tail:
            print(outcome.console_tail, file=sys.stderr)
    elif outcome.status == 0:
        with contextlib.suppress(OSError):
            console_log.unlink()
    return outcome.status


def states_line(config, machine: Machine, kernel_version: str,
                kconfig: dict[str, str]) -> str:
    """What ``hshelper info`` says of saved VM states for this machine and kernel."""
    if not config.get("run", "saved_states"):
        return "off (run.saved_states = false): every run boots"
    why = restores_unsafe(machine, kernel_version, kconfig)
    if why:
        return f"never ({why}): every run boots"
    how = ("the kernel reseeds its RNG through vmgenid" if machine.vmgenid else
           "the guest reseeds its RNG with RNDRESEEDCRNG")
    return f"on: the first run saves one, later runs restore it ({how})"


def print_info(session, args, config, sysroot: Sysroot) -> None:
    """The run side of ``hshelper info``: machine, qemu, accelerator, and why."""
    kernel, choice = initrd.find_kernel(session.host, sysroot, config)
    machine = choice.machine
    print(f"guest architecture: {machine.arch} ({choice.reason})")
    print(f"machine: -machine {machine.machine_tcg} (TCG), {machine.machine_kvm} (KVM); "
          f"-cpu {config.get('run', 'tcg_cpu') or machine.tcg_cpu} (TCG), "
          f"{machine.kvm_cpu} (KVM); console {machine.console}; virtio-{machine.transport}")
    if machine.why:
        print(f"machine choices: {machine.why}")
    boot_kernel = boot_kernel_of(sysroot, kernel, machine, config)
    print(f"boot kernel: {boot_kernel.path} ({boot_kernel.reason})")
    states = states_line(config, machine, kernel.version, sysroot.kernel_config(kernel))
    print(f"saved VM states: {states}")
    try:
        qemu = find_qemu(config.get("run", "qemu"), machine, sysroot)
    except HshelperError as exc:
        print(f"qemu: missing ({exc})")
        return
    print(f"qemu: {qemu}")
    spec = RunSpec(argv=("true",), cwd=os.getcwd(), env=())
    accel = session.host.hook.hshelper_choose_accel(spec=spec, qemu=qemu, config=config,
                                                    machine=machine, kernel=boot_kernel.path)
    if accel is not None:
        print(f"accelerator: {accel.name} ({accel.reason})")


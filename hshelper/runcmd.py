"""The run stage: ``helper-run CMD`` / ``hshelper run`` / ``hshelper shell``.

Builds (or finds) the image, turns the options into a RunSpec, lets the plugins add
shares, disks, kernel parameters and guest steps, appends the per-run archive to a
private copy of the initrd, boots the VM and returns the exit status.
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
import tempfile
import threading
import time
from pathlib import Path

from hshelper import argtypes, elf, guestrun, initrd, kernelimage
from hshelper.config import Layer
from hshelper.errors import HshelperError
from hshelper.model import Accel, RunResult, RunSpec
from hshelper.sysroot import Sysroot
from hshelper.vm import VM, Machine, find_qemu

BASE_CMDLINE = (
    "console=ttyS0",
    "panic=-1",  # reboot at once on a panic; -no-reboot turns that into qemu's exit
    "quiet", "loglevel=3",  # the serial console is slow under TCG
    "rdinit=/init",
    "random.trust_cpu=on",  # RDRAND seeds the RNG at once: no virtio-rng device needed
    "cryptomgr.notests",  # crypto self-tests at every algorithm registration cost seconds
    "8250.nr_uarts=1",  # probing absent UARTs costs time
    "mitigations=off",  # a throwaway VM running the caller's own command
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
                        metavar="SECONDS", help="stop the command after this long (exit 124)")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                        help="accelerator: auto probes KVM for real and falls back to TCG")
    parser.add_argument("--skip-without-kvm", action="store_true",
                        help="when KVM does not work, skip the command: warn and exit 0")
    parser.add_argument("--mode", choices=("image", "root"),
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


def run_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="hshelper-run-", dir=base))


def log_path(config) -> Path:
    logs = initrd.cache_root(config) / "logs"
    logs.mkdir(exist_ok=True)
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


def _signal_handlers(stop: threading.Event):
    def handler(signum, frame):
        stop.status = 128 + signum  # type: ignore[attr-defined]
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM,
                                                  signal.SIGHUP)}
    return old


def chain_run_spec(host, spec: RunSpec, config, args) -> RunSpec:
    """Let each plugin adjust the spec, seeing the previous result: last registered
    first, as pluggy calls hooks (so ``mkimage`` sees the disks and the recipe)."""
    for impl in reversed(host.pm.hook.hshelper_run_spec.get_hookimpls()):
        kwargs = {"spec": spec, "config": config, "args": args}
        changed = impl.function(**{k: kwargs[k] for k in impl.argnames})
        if changed is not None:
            spec = changed
    return spec


def main(session, args, config, shell: bool = False) -> int:
    sysroot = Sysroot(args.sysroot)
    host = session.host
    spec = make_spec(args, config, shell)
    qemu = find_qemu(config.get("run", "qemu"))
    accel = host.hook.hshelper_choose_accel(spec=spec, qemu=qemu, config=config)
    if accel is None:
        accel = Accel("tcg", "no plugin chose an accelerator")
    if args.skip_without_kvm and accel.name != "kvm":
        print(f"hshelper: warning: skipping {' '.join(spec.argv)}: no working KVM "
              f"({accel.reason})", file=sys.stderr)
        host.hook.hshelper_after_run(spec=spec, result=RunResult(
            status=0, reason=f"skipped: no working KVM ({accel.reason})", accel=accel,
            seconds=0.0, boot_seconds=None, console_log=None, skipped=True))
        return 0
    if accel.name == "tcg" and spec.accel == "auto" and args.verbose:
        print(f"hshelper: using TCG: {accel.reason}", file=sys.stderr)
    if not spec.cpus:
        spec = dataclasses.replace(spec, cpus=1 if accel.name == "tcg" else
                                   min(2, os.cpu_count() or 1))
    spec = chain_run_spec(host, spec, config, args)
    if not any(spec.cwd == s.guest or spec.cwd.startswith(s.guest.rstrip("/") + "/")
               for s in spec.shares):
        # Not shared (--no-share-cwd, or no share plugin): the guest starts in /.
        spec = dataclasses.replace(spec, cwd="/")
    interpreter = script_shell(spec.cwd, spec.argv[0], os.environ.get("PATH", ""))
    if interpreter and config.get("run", "mode") == "image" and not spec.interactive:
        # `helper-run mkimage.sh` with `#!/bin/bash`: bash joins the image (a cached
        # variant), although the program budget leaves it out by default.
        config = config.with_layer(Layer(f"#! line of {spec.argv[0]}", {
            "image.programs": [*config.get("image", "programs"), interpreter]}))
    image = initrd.build_image(host, sysroot, config)
    if "virtio_console" not in image.features:
        raise HshelperError(f"kernel {image.kernel_version} has no virtio_console module, "
                            "which carries the command's output",
                            hint="install a kernel with CONFIG_VIRTIO_CONSOLE")
    words = list(BASE_CMDLINE)
    for extra in host.hook.hshelper_kernel_cmdline(spec=spec, image=image, accel=accel):
        words += extra or []
    if spec.extra.get("append"):
        words += spec.extra["append"].split()
    qemu_extra: list[str] = []
    for extra in reversed(host.hook.hshelper_qemu_args(spec=spec, image=image, accel=accel)):
        qemu_extra += extra or []
    steps: list[tuple[str, str]] = []
    for extra in reversed(host.hook.hshelper_guest_setup(spec=spec, image=image)):
        steps += extra or []
    boot_kernel = kernelimage.bootable(image.kernel, initrd.cache_root(config))
    workdir = run_dir()
    stop = threading.Event()
    old_handlers = _signal_handlers(stop)
    console_log = log_path(config)
    started = time.monotonic()
    try:
        run_initrd = workdir / "initrd"
        with open(run_initrd, "wb") as out, \
                open(initrd.boot_initrd(image, accel.name), "rb") as cached:
            shutil.copyfileobj(cached, out, 1 << 20)
            # The kernel takes an uncompressed cpio after a compressed one only at a
            # 4-byte boundary (zero padding is skipped).
            out.write(b"\0" * (-out.tell() % 4))
            out.write(guestrun.run_archive(spec, steps))
        machine = Machine(accel.name, spec.memory_mb, spec.cpus, boot_kernel, run_initrd,
                          " ".join(words), config.get("run", "tcg_cpu"))
        vm = VM(qemu, machine, qemu_extra, console_log, spec.stdin, spec.verbose)
        host.hook.hshelper_before_run(spec=spec, argv=vm.argv)
        if spec.verbose:
            print(f"hshelper: qemu: {shlex.join(vm.argv)}", file=sys.stderr, flush=True)
        if spec.interactive and sys.stdin.isatty():
            print("hshelper: a root shell in the helper VM; leave with exit or Ctrl-D "
                  "(Ctrl-C stops the VM)", file=sys.stderr, flush=True)
        outcome = host.hook.hshelper_run_vm(spec=spec, vm=vm, stop=stop, timeout=spec.timeout)
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        shutil.rmtree(workdir, ignore_errors=True)
    result = RunResult(status=outcome.status, reason=outcome.reason, accel=accel,
                       seconds=time.monotonic() - started, boot_seconds=outcome.boot_seconds,
                       console_log=console_log)
    host.hook.hshelper_after_run(spec=spec, result=result)
    if outcome.reason:
        print(f"hshelper: {outcome.reason} (kernel log: {console_log})", file=sys.stderr)
        if spec.verbose and outcome.console_tail:
            print(outcome.console_tail, file=sys.stderr)
    elif outcome.status == 0:
        with contextlib.suppress(OSError):
            console_log.unlink()
    return outcome.status


def print_info(session, args, config, sysroot: Sysroot) -> None:
    from hshelper.model import RunSpec as _RunSpec

    try:
        qemu = find_qemu(config.get("run", "qemu"))
    except HshelperError as exc:
        print(f"qemu: missing ({exc})")
        return
    print(f"qemu: {qemu}")
    spec = _RunSpec(argv=("true",), cwd=os.getcwd(), env=())
    accel = session.host.hook.hshelper_choose_accel(spec=spec, qemu=qemu, config=config)
    if accel is not None:
        print(f"accelerator: {accel.name} ({accel.reason})")


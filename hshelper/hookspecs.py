"""The plugin contract: every hook hshelper calls, in the order of one run.

A plugin is a module or object with functions named like these specs and marked with
``hshelper.hookimpl``. Built-in plugins live in ``hshelper.plugins``; third-party ones
register under the ``hshelper`` entry-point group; local files are named in the config
(``[plugins] load = ["./my_plugin.py"]``). Every argument is optional for an
implementation: pluggy passes only the ones it names.

The flow::

    hshelper_config_keys            declare config keys          (setup)
    hshelper_add_arguments          declare CLI options          (setup)
    hshelper_configure              see the final config         (setup)
    hshelper_answer_on_host         answer without a VM          (run, firstresult)
    hshelper_find_kernel            pick the kernel              (image, firstresult)
    hshelper_machine                the guest's architecture     (image, firstresult)
    hshelper_image_contents         add modules/programs/files   (image)
    hshelper_image_built            see the image                (image)
    hshelper_choose_accel           kvm or tcg                   (run, firstresult)
    hshelper_run_spec               adjust the run               (run)
    hshelper_kernel_cmdline         add kernel parameters        (run)
    hshelper_qemu_args              add qemu arguments           (run)
    hshelper_root_mounts            mounts in the command's root (run)
    hshelper_guest_setup            add per-run guest steps      (run)
    hshelper_before_run             last look before boot        (run)
    hshelper_run_vm                 run the VM; wrap it          (run, firstresult)
      hshelper_vm_event             a qemu event while it runs   (run, firstresult)
    hshelper_after_run              see the result               (run)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from hshelper.config import Config, Key
    from hshelper.model import Accel, Contents, ImageResult, RunResult, RunSpec
    from hshelper.qemu.machines import Choice, Machine
    from hshelper.qemu.outcome import Outcome
    from hshelper.qemu.vm import VM, Limits, StopRequest
    from hshelper.sysroot import Kernel, Sysroot

hookspec = pluggy.HookspecMarker("hshelper")
hookimpl = pluggy.HookimplMarker("hshelper")

# ------------------------------------------------------------------ setup


@hookspec
def hshelper_config_keys() -> list[Key]:
    """Declare the configuration keys this plugin reads.

    Called once after all plugins are loaded and before any config file is validated.
    Return a list of :class:`hshelper.config.Key` (section, name, type, default, help).
    A key nobody declares is an error in every config layer, with the nearest known key
    suggested. Plugins should use a section named after themselves.
    """


@hookspec
def hshelper_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add command-line options for ``command`` ("build", "run", "shell", "info").

    Called while the command's parser is made, before arguments are parsed. Options
    should map onto config keys (see ``hshelper_configure``) so they layer correctly.
    """


@hookspec
def hshelper_configure(config: Config) -> None:
    """See the final, validated configuration before any work starts.

    Called once per command. Raise HshelperError to refuse a bad combination.
    """


@hookspec(firstresult=True)
def hshelper_answer_on_host(args: argparse.Namespace, config: Config) -> int | None:
    """Answer a run from the host, without building an image or booting a VM, when the
    host already has the answer (a recipe's ``--help``, vm-run's ``--kernels``).

    Called once per ``run`` (``helper-run``) after the configuration is final and before
    anything else. Print the answer and return the exit status; the first non-None
    answer ends the command. Return None to let the run go on.
    """


# ------------------------------------------------------------------ image


@hookspec(firstresult=True)
def hshelper_find_kernel(sysroot: Sysroot, version: str | None, config: Config) -> Kernel | None:
    """Find the kernel to boot in the build root.

    ``version`` is what ``--kernel`` asked for, or None for "the newest". The first
    non-None answer wins; the built-in ``kernel`` plugin answers last with the standard
    layouts (/boot/vmlinuz-V, /lib/modules/V/vmlinuz, /usr/lib/modules/V/vmlinuz), so a
    plugin for an unusual layout only has to answer when it recognises its own.
    """


@hookspec(firstresult=True)
def hshelper_machine(sysroot: Sysroot, kernel: Kernel, config: Config) -> Choice | None:
    """Say which machine (architecture row of hshelper.qemu.machines) runs the guest.

    Called once per image plan and run, after the kernel is found. The first non-None
    answer wins; the core answers last with the build root's own architecture (from a
    kernel module's ELF header, else the build root's shell), so a plugin can add an
    architecture the table lacks, or force one. Return a ``Choice(machine, reason)``.
    """


@hookspec
def hshelper_image_contents(sysroot: Sysroot, kernel: Kernel, config: Config,
                            machine: Machine) -> Contents | None:
    """Contribute to the helper image: kernel modules, programs, files, directories,
    device nodes and boot-time init steps.

    Called once per image plan, for every plugin; the contributions are merged in plugin
    order. Return a :class:`hshelper.model.Contents` or None. What is contributed here
    is part of the image's cache key, so it must not depend on per-run data (the command,
    the working directory, disks): that goes into ``hshelper_guest_setup``. ``machine``
    is the guest's architecture row (its transport and panic modules, for example).
    """


@hookspec
def hshelper_image_built(image: ImageResult) -> None:
    """See the image after it was built or found in the cache. Return value ignored."""


# ------------------------------------------------------------------ run


@hookspec(firstresult=True)
def hshelper_choose_accel(spec: RunSpec, qemu: str, config: Config, machine: Machine,
                          kernel: Path) -> Accel | None:
    """Choose the accelerator for a run: return ``Accel("kvm"|"tcg", reason)``.

    ``spec.accel`` holds what the user asked for ("auto", "kvm", "tcg"); ``machine`` is
    the guest's architecture row (KVM needs the host's), ``kernel`` the file qemu will
    boot (a probe may boot it). The first non-None answer wins. The built-in ``accel``
    plugin probes KVM for real (a guest must run, not merely /dev/kvm exist), caches the
    answer for the boot, and falls back to TCG. Raise HshelperError when the user's
    demand cannot be met.
    """


@hookspec
def hshelper_run_spec(spec: RunSpec, config: Config, args: argparse.Namespace,
                      image: ImageResult, machine: Machine) -> RunSpec | None:
    """Adjust the run before it starts (add shares or disks, change memory, ...).

    ``args`` is the parsed command line, so a plugin reads the options it added in
    ``hshelper_add_arguments``; ``image`` is the helper image (its ``features``: the
    modules it carries), ``machine`` the guest's architecture row. The ``buildroot``
    plugin runs first and settles ``spec.mode``.

    Called last-registered first, as pluggy calls hooks (a local or third-party plugin
    before the built-in ones; among those, ``recipes`` before ``disks`` before
    ``mkimage``); each receives the spec the previous one returned. Return a
    new RunSpec (``dataclasses.replace``) or None to leave it as it is.
    """


@hookspec
def hshelper_kernel_cmdline(spec: RunSpec, image: ImageResult, accel: Accel) -> list[str] | None:
    """Return kernel command-line words to add for this run (e.g. ``["quiet"]``)."""


@hookspec
def hshelper_qemu_args(spec: RunSpec, image: ImageResult, accel: Accel,
                       machine: Machine) -> list[str] | None:
    """Return qemu arguments to add for this run (devices, shares, disks).

    The core supplies the machine, CPU, memory, kernel, initrd and the guest channels;
    plugins add the rest, naming devices for the machine's transport
    (``machine.device("virtio-blk")``). Arguments are lists, never shell strings.
    """


@hookspec
def hshelper_root_mounts(spec: RunSpec) -> list[tuple[str, str, str, str]] | None:
    """Return fstab entries (what, where, type, options) to mount in the command's root
    together with it: one mount program for the build root, its overlay and these
    (under TCG every program start costs tens of milliseconds). Paths are as the init
    sees them: the command's root is :data:`hshelper.guestabi.NEWROOT`, so a mount
    point or bind source there is ``NEWROOT + path``, and it must exist there (in the
    build root or the image). Called once per run, after ``hshelper_run_spec``; the
    entries are mounted in plugin order after the root's own (plugin buildroot), and
    only when the run has a command root (not in ``--mode isolated``).
    """


@hookspec
def hshelper_guest_setup(spec: RunSpec, image: ImageResult, machine: Machine,
                         root_mounts: list[tuple[str, str, str, str]]
                         ) -> list[tuple[str, str]] | None:
    """Return per-run guest steps: (name, POSIX shell code) pairs.

    They run in the guest init (in the image's own root, not the command's) after the
    image's own init steps and before the payload, in plugin order, as root, inside one
    shell function, with ``set -e``-like care left to the step (``return 1`` fails the
    run). The command's root is ``$hsh_newroot`` there (empty when the run has the image
    alone): a file the command should see goes to ``"$hsh_newroot/PATH"``. ``$hsh_mount``
    is the cheapest mount program for explicit ``-t TYPE`` mounts and ``hsh_load MOD...``
    loads the image's modules (under TCG every program start costs). hshelper.guestabi
    lists these names. The steps travel in the run script sent once the guest is ready,
    so they never invalidate the image, and a saved VM state serves every run.
    ``root_mounts``: every plugin's ``hshelper_root_mounts``, for the plugin that mounts
    the command's root.
    """


@hookspec
def hshelper_before_run(spec: RunSpec, argv: list[str]) -> None:
    """See the final run spec and the exact qemu command line just before the VM starts.

    Raise HshelperError to stop the run (exit 125).
    """


@hookspec(firstresult=True)
def hshelper_run_vm(spec: RunSpec, vm: VM, stop: StopRequest, limits: Limits,
                    script: bytes) -> Outcome | None:
    """Run the prepared VM to its end and return its :class:`hshelper.qemu.outcome.Outcome`.

    The core answers (it starts qemu, sends ``script`` when the guest is ready and
    streams the channels). Plugins wrap it with ``@hookimpl(hookwrapper=True)``: code
    before ``yield`` runs just before qemu starts, code after it once the VM is gone,
    also on failure (heartbeats, timing, cleanup). ``vm.activity`` has the start time
    and the time of the last output; ``stop`` is set by SIGINT/SIGTERM; ``limits`` holds
    the boot and command deadlines. Old-style hookwrappers keep it working with pluggy
    1.0 (RHEL 9, Debian 12).
    """


@hookspec(firstresult=True)
def hshelper_vm_event(spec: RunSpec, event: dict) -> str | None:
    """See an event qemu reported on its control channel (QMP) while the VM runs.

    ``event`` is QMP's message: ``{"event": NAME, "data": {...}, "timestamp": ...}``
    (``BLOCK_IO_ERROR``, ``STOP``, ``RESUME``, ``GUEST_PANICKED``, ``SHUTDOWN``, ...).
    Called from the VM's loop, so it must be quick. Return a one-line reason to end the
    run at once (qemu is killed; exit status 125 with that reason), or None. The core
    ends the run by itself on a disk write error that paused the VM and on a guest
    panic.
    """


@hookspec
def hshelper_after_run(spec: RunSpec, result: RunResult) -> None:
    """See the result of a run: exit status, timings, accelerator, artifacts.

    Called after the VM has stopped, also when the command failed, and when the run was
    skipped (``--skip-without-kvm`` without KVM: ``result.skipped`` is true, no VM ran,
    and ``spec`` was not adjusted by ``hshelper_run_spec``). Return value ignored.
    """

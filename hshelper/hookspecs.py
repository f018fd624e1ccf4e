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
    hshelper_image_contents         add modules/programs/files   (image)
    hshelper_image_built            see the image                (image)
    hshelper_choose_accel           kvm or tcg                   (run, firstresult)
    hshelper_run_spec               adjust the run               (run)
    hshelper_kernel_cmdline         add kernel parameters        (run)
    hshelper_qemu_args              add qemu arguments           (run)
    hshelper_guest_setup            add per-run guest steps      (run)
    hshelper_before_run             last look before boot        (run)
    hshelper_run_vm                 run the VM; wrap it          (run, firstresult)
    hshelper_after_run              see the result               (run)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse
    import threading

    from hshelper.config import Config, Key
    from hshelper.model import Accel, Contents, ImageResult, RunResult, RunSpec
    from hshelper.sysroot import Kernel, Sysroot
    from hshelper.vm import VM, Outcome

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


@hookspec
def hshelper_image_contents(sysroot: Sysroot, kernel: Kernel, config: Config) -> Contents | None:
    """Contribute to the helper image: kernel modules, programs, files, directories,
    device nodes and boot-time init steps.

    Called once per image plan, for every plugin; the contributions are merged in plugin
    order. Return a :class:`hshelper.model.Contents` or None. What is contributed here
    is part of the image's cache key, so it must not depend on per-run data (the command,
    the working directory, disks): that goes into ``hshelper_guest_setup``.
    """


@hookspec
def hshelper_image_built(image: ImageResult) -> None:
    """See the image after it was built or found in the cache. Return value ignored."""


# ------------------------------------------------------------------ run


@hookspec(firstresult=True)
def hshelper_choose_accel(spec: RunSpec, qemu: str, config: Config) -> Accel | None:
    """Choose the accelerator for a run: return ``Accel("kvm"|"tcg", reason)``.

    ``spec.accel`` holds what the user asked for ("auto", "kvm", "tcg"). The first
    non-None answer wins. The built-in ``accel`` plugin probes KVM for real (a guest must
    run, not merely /dev/kvm exist), caches the answer for the boot, and falls back to
    TCG. Raise HshelperError when the user's demand cannot be met.
    """


@hookspec
def hshelper_run_spec(spec: RunSpec, config: Config,
                      args: argparse.Namespace) -> RunSpec | None:
    """Adjust the run before it starts (add shares or disks, change memory, ...).

    ``args`` is the parsed command line, so a plugin reads the options it added in
    ``hshelper_add_arguments``.

    Called last-registered first, as pluggy calls hooks (a local or third-party plugin
    before the built-in ones; among those, ``recipes`` before ``disks`` before
    ``mkimage``); each receives the spec the previous one returned. Return a
    new RunSpec (``dataclasses.replace``) or None to leave it as it is.
    """


@hookspec
def hshelper_kernel_cmdline(spec: RunSpec, image: ImageResult, accel: Accel) -> list[str] | None:
    """Return kernel command-line words to add for this run (e.g. ``["quiet"]``)."""


@hookspec
def hshelper_qemu_args(spec: RunSpec, image: ImageResult, accel: Accel) -> list[str] | None:
    """Return qemu arguments to add for this run (devices, shares, disks).

    The core supplies the machine, CPU, memory, kernel, initrd and the guest channels;
    plugins add the rest. Arguments are lists, never shell strings.
    """


@hookspec
def hshelper_guest_setup(spec: RunSpec, image: ImageResult) -> list[tuple[str, str]] | None:
    """Return per-run guest steps: (name, POSIX shell code) pairs.

    They run in the guest after the image's own init steps and before the payload, in
    plugin order, as root, with ``set -e``-like care left to the step. ``$hsh_mount``
    is the cheapest mount program for explicit ``-t TYPE`` mounts (busybox's where
    there is one; under TCG every library a program loads costs time). They travel in a
    small per-run archive appended to the cached initrd, so they never invalidate it.
    """


@hookspec
def hshelper_before_run(spec: RunSpec, argv: list[str]) -> None:
    """See the final run spec and the exact qemu command line just before the VM starts.

    Raise HshelperError to stop the run (exit 125).
    """


@hookspec(firstresult=True)
def hshelper_run_vm(spec: RunSpec, vm: VM, stop: threading.Event,
                    timeout: float | None) -> Outcome | None:
    """Run the prepared VM to its end and return its :class:`hshelper.vm.Outcome`.

    The core answers (it starts qemu and streams the channels). Plugins wrap it with
    ``@hookimpl(hookwrapper=True)``: code before ``yield`` runs just before qemu starts,
    code after it once the VM is gone, also on failure (heartbeats, timing, cleanup).
    ``vm.monitor`` has the start time and the time of the last output; ``stop`` is set
    by SIGINT/SIGTERM; ``timeout`` is the run's limit in seconds or None. Old-style
    hookwrappers keep it working with pluggy 1.0 (RHEL 9, Debian 12).
    """


@hookspec
def hshelper_after_run(spec: RunSpec, result: RunResult) -> None:
    """See the result of a run: exit status, timings, accelerator, artifacts.

    Called after the VM has stopped, also when the command failed, and when the run was
    skipped (``--skip-without-kvm`` without KVM: ``result.skipped`` is true, no VM ran,
    and ``spec`` was not adjusted by ``hshelper_run_spec``). Return value ignored.
    """

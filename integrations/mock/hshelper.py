"""hshelper plugin for mock (Fedora/RHEL): run a ``helper-run`` step after a successful
build, as the unprivileged build user inside the build root, and put what it makes into
mock's result directory.

Install as ``hshelper.py`` in mock's plugin directory (``config_opts['plugin_dir']``,
e.g. /usr/lib/python3.X/site-packages/mockbuild/plugins; package hshelper-mock) and add
to ``/etc/mock/site-defaults.cfg`` (or a chroot config)::

    config_opts['plugins'].append('hshelper')
    config_opts['plugin_conf']['hshelper_enable'] = False   # mock --enable-plugin=hshelper
    config_opts['plugin_conf']['hshelper_opts'] = {
        'command': '/usr/share/hshelper/integrations/common/hshelper-image-from-packages'
                   ' --size 1G /hshelper-base/base.tar',
    }

(docs/integrations.md has the complete example, with the bind mount of base.tar.)

Options (``config_opts['plugin_conf']['hshelper_opts']``):

``command``      the step: a shell string or an argv list (required)
``workdir``      its working directory in the chroot (default: ``<homedir>/hshelper``)
``artifacts``    globs, relative to workdir, copied to the result dir (default ``['*']``)
``report``       file name of hshelper's JSON run report in workdir ('' for none)
``kvm``          give the chroot the host's /dev/kvm (default False, see below)
``after_failure``  run the step after a failed build too (default False)
``env``          extra environment for the step (a dict)

``kvm``: mock gives a build root no /dev/kvm, and its maintainers keep it that way by
default (a device of the host in a chroot the build's code controls; mock issue 569).
So does this plugin: without it helper-run runs its VM under TCG (emulation: slower,
the same result), and the plugin says so in the log. ``'kvm': True`` bind-mounts the
host's /dev/kvm into the chroot (simple isolation) or adds ``--bind=/dev/kvm`` and
``--property=DeviceAllow=/dev/kvm rw`` to ``nspawn_args`` (systemd-nspawn), for the
build (a %check using helper-run) and the step alike; hshelper still uses KVM only
after a probe guest really ran under it.

The step's environment is mock's (``buildroot.env``) plus ``HSHELPER_RPMS`` (the chroot
paths of the built binary RPMs, space-separated), ``HSHELPER_PACKAGES`` (the same, the
name hshelper-after-build uses), ``HSHELPER_BUILD_RESULT``, ``HSHELPER_REPORT_FILE`` and
``env``. It runs through mock's own ``Buildroot.doChroot``, as mock's bundled plugins
run theirs. The plugin is skipped in mock's bootstrap chroot (``run_in_bootstrap``; older
mock, which ignores it, gets the same from ``buildroot.is_bootstrap``). This module
imports nothing from mock at import time, so it loads (and is tested) without mock.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

requires_api_version = "1.1"
# mock >= 5.0 does not initialise plugins that say so for its bootstrap chroot, which
# only installs packages: no step to run, no /dev/kvm to give.
run_in_bootstrap = False

DEFAULTS = {"command": None, "workdir": None, "artifacts": ["*"],
            "report": "hshelper-report.json", "kvm": False, "after_failure": False, "env": {}}
KVM = "/dev/kvm"
# systemd-nspawn gives a container its own /dev and a device policy: both must allow kvm.
NSPAWN_KVM_ARGS = ("--bind=/dev/kvm", "--property=DeviceAllow=/dev/kvm rw")
SWITCH = "config_opts['plugin_conf']['hshelper_opts']['kvm'] = True"

log = logging.getLogger("mockbuild.plugins.hshelper")


def init(plugins, conf, buildroot):
    """mock's plugin entry point (API 1.1)."""
    if getattr(buildroot, "is_bootstrap", False):
        return
    HshelperStep(plugins, conf, buildroot)


def options(conf: dict) -> dict:
    """The plugin's options over their defaults; mock adds keys of its own (basedir,
    resultdir, ...) to every ``*_opts`` dict, which are kept and ignored."""
    merged = {**DEFAULTS, **(conf or {})}
    if isinstance(merged["artifacts"], str):
        merged["artifacts"] = [merged["artifacts"]]
    return merged


def step_argv(command, env: dict[str, str]) -> list[str]:
    """The argv for doChroot: ``env`` in front (mock's doChroot builds the environment
    from ``buildroot.env`` itself), then a shell string through sh -c (as in a %check
    line) or a list as it is."""
    words = ["/bin/sh", "-c", command] if isinstance(command, str) \
        else [str(word) for word in command]
    return ["/usr/bin/env", *[f"{k}={v}" for k, v in env.items()], *words]


def kvm_plan(wanted: bool, use_nspawn: bool, host_has_kvm: bool) -> tuple[bool, tuple, str]:
    """(bind-mount /dev/kvm into the chroot, nspawn_args to add, what to tell the user)
    for the ``kvm`` option, mock's isolation and the host."""
    if not wanted:
        return False, (), ("hshelper: the chroot gets no /dev/kvm (mock's default): "
                           f"helper-run runs its VM under TCG, slower; {SWITCH} gives it "
                           "the host's")
    if not host_has_kvm:
        return False, (), "hshelper: the host has no /dev/kvm: helper-run uses TCG"
    if use_nspawn:
        return False, NSPAWN_KVM_ARGS, ("hshelper: /dev/kvm for the chroot (systemd-nspawn "
                                        "--bind); hshelper uses it after a probe")
    return True, (), "hshelper: /dev/kvm bind-mounted into the chroot; hshelper uses it " \
                     "after a probe"


def built_rpms(chroot_builddir: str, host_builddir: str) -> list[str]:
    """Binary RPMs the build left, as chroot paths (flat or per-arch RPMS layout)."""
    found = glob.glob(os.path.join(host_builddir, "RPMS", "*.rpm")) + \
        glob.glob(os.path.join(host_builddir, "RPMS", "*", "*.rpm"))
    return sorted(os.path.join(chroot_builddir, os.path.relpath(p, host_builddir))
                  for p in found)


def inside(path: str, top: str) -> bool:
    """``path`` resolves to ``top`` or below it (no symlink leads out)."""
    real, top = os.path.realpath(path), os.path.realpath(top)
    return real == top or real.startswith(top.rstrip("/") + "/")


def collect(workdir_host: str, patterns: list[str], resultdir: str, owner: tuple[int, int]
            ) -> list[str]:
    """Copy the regular files matching ``patterns`` from the step's workdir to the result
    dir, owned like the result dir (mock's caller). This runs as root on files the build
    made, so symlinks are never followed. Returns the names copied."""
    copied: list[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(workdir_host, pattern))):
            name = os.path.relpath(path, workdir_host)
            if name in copied or os.path.islink(path) or not os.path.isfile(path) \
                    or not inside(path, workdir_host):
                continue
            dest = os.path.join(resultdir, name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(path, "rb", opener=_nofollow) as src, open(dest, "wb") as out:
                copy_sparse(src.fileno(), out.fileno())
            os.chown(dest, *owner)
            copied.append(name)
    return copied


def copy_sparse(src: int, dst: int, chunk: int = 1 << 20) -> None:
    """Copy the data of ``src`` to ``dst`` and leave its holes holes: disk images are
    mostly holes, and a copy that writes them out costs their full size."""
    size = os.fstat(src).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(src, start, os.SEEK_SET)
        os.lseek(dst, start, os.SEEK_SET)
        while start < end:
            data = os.read(src, min(chunk, end - start))
            if not data:
                break
            os.write(dst, data)
            start += len(data)
        pos = end
    os.ftruncate(dst, size)


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def fresh_workdir(root: str, workdir_host: str, owner: tuple[int, int]) -> None:
    """An empty workdir owned by the build user. Refuses a path that a symlink in the
    build root redirects (the build user controls the root; this runs as root)."""
    if not inside(os.path.dirname(workdir_host), root) or os.path.islink(workdir_host):
        raise RuntimeError(f"hshelper: {workdir_host} leads outside the build root")
    shutil.rmtree(workdir_host, ignore_errors=True)
    os.makedirs(workdir_host)
    os.chown(workdir_host, *owner, follow_symlinks=False)


class HshelperStep:
    """Registered hooks: ``postinit`` (the /dev/kvm mount point, when asked for),
    ``postbuild`` (run the step)."""

    def __init__(self, plugins, conf, buildroot):
        self.buildroot = buildroot
        self.opts = options(conf)
        if not self.opts["command"]:
            log.warning("hshelper plugin enabled without hshelper_opts['command']: "
                        "nothing to run")
            return
        from mockbuild import util  # mock is running: it exists

        bind, nspawn, message = kvm_plan(bool(self.opts["kvm"]), bool(util.USE_NSPAWN),
                                         os.path.exists(KVM))
        log.info(message)
        config = buildroot.config
        extra = [arg for arg in nspawn if arg not in config.get("nspawn_args", [])]
        if extra:
            # mock passes config['nspawn_args'] to the build's own commands: a %check
            # running helper-run gets /dev/kvm too.
            config["nspawn_args"] = [*config.get("nspawn_args", []), *extra]
        if bind:
            from mockbuild.mounts import BindMountPoint

            buildroot.mounts.add_user_mount(BindMountPoint(
                srcpath=KVM, bindpath=buildroot.make_chroot_path(KVM)))
            plugins.add_hook("postinit", self.make_kvm_node)
        plugins.add_hook("postbuild", self.run_step)

    def make_kvm_node(self):
        """A bind mount needs a file to mount on (mock mounts user mounts after the
        postinit hooks)."""
        target = self.buildroot.make_chroot_path(KVM)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()

    def run_step(self):
        buildroot = self.buildroot
        result = getattr(buildroot.state, "result", None)
        if result != "success" and not self.opts["after_failure"]:
            # mock calls postbuild in a finally: after failures and SRPM-only builds too.
            log.info("hshelper: build result is %r, not running the step", result)
            return
        workdir = self.opts["workdir"] or os.path.join(buildroot.homedir, "hshelper")
        workdir_host = buildroot.make_chroot_path(workdir)
        fresh_workdir(buildroot.make_chroot_path(), workdir_host,
                      (buildroot.chrootuid, buildroot.chrootgid))
        rpms = " ".join(built_rpms(buildroot.builddir,
                                   buildroot.make_chroot_path(buildroot.builddir)))
        env = {str(k): str(v) for k, v in self.opts["env"].items()}
        env.update(HSHELPER_RPMS=rpms, HSHELPER_PACKAGES=rpms,
                   HSHELPER_BUILD_RESULT=str(result))
        patterns = list(self.opts["artifacts"])
        if self.opts["report"]:
            env["HSHELPER_REPORT_FILE"] = os.path.join(workdir, self.opts["report"])
            patterns.append(self.opts["report"])
        argv = step_argv(self.opts["command"], env)
        config = buildroot.config
        log.info("hshelper: running %s in %s as %s", argv, workdir, buildroot.chrootuser)
        try:
            # What mock's bundled plugins pass (rpmautospec): doChroot makes the
            # environment from buildroot.env, so none is given here.
            buildroot.doChroot(argv, shell=False, cwd=workdir, logger=buildroot.build_log,
                               uid=buildroot.chrootuid, gid=buildroot.chrootgid,
                               user=buildroot.chrootuser, printOutput=True,
                               unshare_net=not config.get("rpmbuild_networking", False),
                               nspawn_args=list(config.get("nspawn_args", [])))
        finally:
            # Also after a failed step: its report and partial output explain the failure.
            st = os.stat(buildroot.resultdir)
            copied = collect(workdir_host, patterns, buildroot.resultdir,
                             (st.st_uid, st.st_gid))
            log.info("hshelper: copied to %s: %s", buildroot.resultdir,
                     ", ".join(copied) or "nothing")

"""hshelper plugin for mock (Fedora/RHEL): run a ``helper-run`` step after a successful
build, as the unprivileged build user inside the build root, and put what it makes into
mock's result directory.

Install as ``hshelper.py`` in mock's plugin directory (``config_opts['plugin_dir']``,
e.g. /usr/lib/python3.X/site-packages/mockbuild/plugins) and add to
``/etc/mock/site-defaults.cfg`` (or a chroot config)::

    config_opts['plugins'].append('hshelper')
    config_opts['plugin_conf']['hshelper_enable'] = False   # mock --enable-plugin=hshelper
    config_opts['plugin_conf']['hshelper_opts'] = {
        'command': 'helper-run --disk disk.img,size=1G,name=out ./mkimage.sh',
    }

Options (``config_opts['plugin_conf']['hshelper_opts']``):

``command``      the step: a shell string or an argv list (required)
``workdir``      its working directory in the chroot (default: ``<homedir>/hshelper``)
``artifacts``    globs, relative to workdir, copied to the result dir (default ``['*']``)
``report``       file name of hshelper's JSON run report in workdir ('' for none)
``kvm``          give the chroot the host's /dev/kvm when there is one (default True)
``after_failure``  run the step after a failed build too (default False)
``env``          extra environment for the step (a dict)

The step's environment has ``HSHELPER_RPMS`` (the chroot paths of the built binary
RPMs, space-separated) and ``HSHELPER_BUILD_RESULT``. This module imports nothing from
mock at import time, so it loads (and is tested) without mock installed.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

requires_api_version = "1.1"

DEFAULTS = {"command": None, "workdir": None, "artifacts": ["*"],
            "report": "hshelper-report.json", "kvm": True, "after_failure": False, "env": {}}
KVM = "/dev/kvm"
# systemd-nspawn gives a container its own /dev and a device policy: both must allow kvm.
NSPAWN_KVM_ARGS = ["--bind=/dev/kvm", "--property=DeviceAllow=/dev/kvm rw"]

log = logging.getLogger("mockbuild.plugins.hshelper")


def init(plugins, conf, buildroot):
    """mock's plugin entry point (API 1.1)."""
    HshelperStep(plugins, conf, buildroot)


def options(conf: dict) -> dict:
    """The plugin's options over their defaults; mock adds keys of its own (basedir,
    resultdir, ...) to every ``*_opts`` dict, which are kept and ignored."""
    merged = {**DEFAULTS, **(conf or {})}
    if isinstance(merged["artifacts"], str):
        merged["artifacts"] = [merged["artifacts"]]
    return merged


def step_argv(command) -> list[str]:
    """A shell string runs with sh -c (as in a %check line); a list is the argv."""
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    return [str(word) for word in command]


def kvm_setup(isolation: str, host_has_kvm: bool) -> tuple[bool, list[str]]:
    """(bind-mount /dev/kvm into the chroot, extra nspawn_args) for mock's isolation
    mode. mock itself gives a build root no /dev/kvm."""
    if not host_has_kvm:
        return False, []
    if isolation == "simple":
        return True, []
    # "nspawn", or "auto" (nspawn when it is usable): both, the bind mount serving a
    # fallback to simple chroot.
    return True, list(NSPAWN_KVM_ARGS)


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
                shutil.copyfileobj(src, out)
            os.chown(dest, *owner)
            copied.append(name)
    return copied


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
    """Registered hooks: ``postinit`` (make the /dev/kvm mount point), ``postbuild``
    (run the step)."""

    def __init__(self, plugins, conf, buildroot):
        self.buildroot = buildroot
        self.opts = options(conf)
        if not self.opts["command"]:
            log.warning("hshelper plugin enabled without hshelper_opts['command']: "
                        "nothing to run")
            return
        self.bind_kvm = False
        if self.opts["kvm"]:
            config = buildroot.config
            self.bind_kvm, nspawn = kvm_setup(config.get("isolation", "auto"),
                                              os.path.exists(KVM))
            if nspawn:
                config["nspawn_args"] = [*config.get("nspawn_args", []),
                                         *[a for a in nspawn
                                           if a not in config.get("nspawn_args", [])]]
            if self.bind_kvm:
                from mockbuild.mounts import BindMountPoint  # mock is running: it exists

                buildroot.mounts.add_user_mount(BindMountPoint(
                    srcpath=KVM, bindpath=buildroot.make_chroot_path(KVM)))
                plugins.add_hook("postinit", self.make_kvm_node)
        plugins.add_hook("postbuild", self.run_step)

    def make_kvm_node(self):
        """A bind mount needs a file to mount on."""
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
        env = dict(buildroot.env)
        env.update({str(k): str(v) for k, v in self.opts["env"].items()})
        env["HSHELPER_RPMS"] = " ".join(built_rpms(
            buildroot.builddir, buildroot.make_chroot_path(buildroot.builddir)))
        env["HSHELPER_BUILD_RESULT"] = str(result)
        patterns = list(self.opts["artifacts"])
        if self.opts["report"]:
            env["HSHELPER_REPORT_FILE"] = os.path.join(workdir, self.opts["report"])
            patterns.append(self.opts["report"])
        argv = step_argv(self.opts["command"])
        log.info("hshelper: running %s in %s as %s", argv, workdir, buildroot.chrootuser)
        try:
            buildroot.doChroot(argv, shell=False, cwd=workdir, env=env,
                               uid=buildroot.chrootuid, gid=buildroot.chrootgid,
                               user=buildroot.chrootuser, printOutput=True,
                               nspawn_args=list(buildroot.config.get("nspawn_args", [])))
        finally:
            # Also after a failed step: its report and partial output explain the failure.
            st = os.stat(buildroot.resultdir)
            copied = collect(workdir_host, patterns, buildroot.resultdir,
                             (st.st_uid, st.st_gid))
            log.info("hshelper: copied to %s: %s", buildroot.resultdir,
                     ", ".join(copied) or "nothing")

"""Stand-ins for the parts of mock that the hshelper mock plugin touches.

mock cannot be installed on Debian 12 (apt has no candidate; PyPI's ``mockbuild`` is a
placeholder), so the plugin runs against these. Each mirrors its original's signature
and what its body does, as read in mock's source (rpm-software-management/mock,
mock/py/mockbuild/, mock 5.x and 6.x), so that a call the real one would reject fails
here too (a second ``env`` for doChroot is a TypeError, as in mock):

- ``Plugins`` - plugin.py: ``init_plugins`` (the ``*_opts`` keys, ``<name>_enable``,
  plugins found in ``plugin_dir``, ``requires_api_version``, ``run_in_bootstrap``),
  ``add_hook``, ``call_hooks``;
- ``Buildroot`` - buildroot.py: the attributes ``__init__`` sets (``env`` is
  ``config['environment']``, ``HOME`` forced to the chroot home), ``make_chroot_path``,
  ``doChroot(command, nosync=False, *args, **kargs)``, the end of ``_init`` (postinit
  hooks, then the user mounts) as ``finish_init``;
- ``do_with_status`` with ``ChildPreExec`` and ``prepare_nspawn_command`` - util.py:
  simple isolation chroots, drops to uid/gid and changes directory in the child (for
  real here); systemd-nspawn gets ``nspawn_args``, ``-u USER``, ``--chdir`` and one
  ``--setenv`` per variable;
- ``BindMountPoint``, ``Mounts`` - mounts.py: ``add_user_mount``, ``mountall_user``
  (``mount --bind``, for real), ``umountall``;
- ``Error`` - exception.py;
- ``buildroots`` - mock.py's main(): the bootstrap buildroot gets its own Plugins, a
  deep copy of ``plugin_conf`` and a copy of ``nspawn_args``, and ``is_bootstrap``.

``install(monkeypatch)`` puts them in ``sys.modules`` as ``mockbuild``, ``mockbuild.util``,
``mockbuild.mounts`` and ``mockbuild.exception`` for the plugin's imports.
"""

from __future__ import annotations

import copy
import ctypes
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import types
import uuid
from dataclasses import dataclass, field

CURRENT_API_VERSION = "1.1"
CLONE_NEWIPC = 0x08000000
# util.USE_NSPAWN: set by mock's config handling before any Buildroot exists.
USE_NSPAWN = False
# Every command do_with_status started (argv, returncode, stdout, stderr), for the tests.
RUNS: list[dict] = []


class Error(Exception):
    """mockbuild.exception.Error(msg, status=None): resultcode 1 unless given."""

    def __init__(self, msg, status=None):
        super().__init__(msg)
        self.msg = msg
        self.resultcode = 1 if status is None else status


# ------------------------------------------------------------------ util.py


def clean_env() -> dict[str, str]:
    """util.clean_env: the environment do_with_status uses when given none."""
    return {"TERM": "vt100", "SHELL": "/bin/sh", "HOME": "/builddir", "HOSTNAME": "mock",
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


def mkdirIfAbsent(path: str) -> None:  # mock's name
    """file_util.mkdirIfAbsent (util.mkdirIfAbsent in older mock)."""
    if not os.path.exists(path):
        os.makedirs(path)


class ChildPreExec:
    """util.ChildPreExec: what runs in the child between fork and exec."""

    def __init__(self, personality, chrootPath, cwd, uid, gid, env=None, shell=False,
                 unshare_ipc=False, unshare_net=False, no_setsid=False):
        self.chrootPath, self.cwd, self.uid, self.gid = chrootPath, cwd, uid, gid
        self.shell, self.unshare_ipc, self.no_setsid = shell, unshare_ipc, no_setsid

    def __call__(self):
        if not self.shell and not self.no_setsid:
            os.setsid()
        os.umask(0o02)
        if not USE_NSPAWN or not self.chrootPath:
            if self.chrootPath is not None:  # condChroot
                os.chdir(self.chrootPath)
                os.chroot(self.chrootPath)
            if self.gid is not None:  # condDropPrivs: no setgroups, as in mock
                os.setregid(self.gid, self.gid)
            if self.uid is not None:
                os.setreuid(self.uid, self.uid)
            if self.cwd is not None:  # condChdir
                os.chdir(self.cwd)
        if self.unshare_ipc:  # condUnshareIPC
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWIPC)


def prepare_nspawn_command(chrootPath, user, cmd, nspawn_args=None, env=None, cwd=None,
                           interactive=False, shell=False) -> list[str]:
    """util._prepare_nspawn_command (with a systemd-nspawn that has --pipe, --chdir and
    --resolv-conf, as every current one has)."""
    argv = ["/usr/bin/systemd-nspawn", "-q", "-M", uuid.uuid4().hex, "-D", chrootPath, "-a"]
    if user:
        argv += ["-u", str(user)]
    if nspawn_args:
        argv.extend(nspawn_args)
    argv += ["--console=pipe"]
    if cwd:
        argv.append(f"--chdir={cwd}")
    assert env is not None
    argv += [f"--setenv={k}={v}" for k, v in env.items()]
    argv.append("--resolv-conf=off")
    if shell and isinstance(cmd, list):
        cmd = " ".join(cmd)
    if isinstance(cmd, str):
        cmd = ["/bin/sh", "-c", cmd]
    return argv + cmd


def do_with_status(command, shell=False, chrootPath=None, cwd=None, timeout=0, raiseExc=True,
                   returnOutput=0, uid=None, gid=None, user=None, personality=None,
                   printOutput=False, env=None, pty=False, nspawn_args=None, unshare_net=False,
                   returnStderr=True, *_, **kargs):
    """util.do_with_status: run ``command`` (in ``chrootPath`` as uid:gid, or through
    systemd-nspawn), return (output, returncode); raise Error when it fails and
    ``raiseExc``. Output is collected at the end rather than streamed."""
    preexec = ChildPreExec(personality, chrootPath, cwd, uid, gid,
                           unshare_ipc=bool(chrootPath), unshare_net=unshare_net)
    if env is None:
        env = clean_env()
    if isinstance(command, list):
        command = [str(x) for x in command]
    if chrootPath and USE_NSPAWN:
        command = prepare_nspawn_command(chrootPath, user, command, nspawn_args=nspawn_args,
                                         env=env, cwd=cwd, shell=shell)
        shell = False
    record = {"command": command, "uid": uid, "gid": gid, "cwd": cwd, "env": dict(env),
              "nspawn_args": nspawn_args, "chrootPath": chrootPath}
    RUNS.append(record)
    if chrootPath and USE_NSPAWN:
        # Recorded, not run: the tests check the container mock would start.
        record["returncode"] = None
        raise Error("Command failed: the stand-in does not start systemd-nspawn")
    with open(os.devnull) as stdin:
        proc = subprocess.run(command, shell=shell, env=env, stdin=stdin,
                              capture_output=True, preexec_fn=preexec,
                              timeout=timeout or None)
    stdout, stderr = (proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
    record.update(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    output = stdout + (stderr if returnStderr else "") if returnOutput else ""
    if raiseExc and proc.returncode:
        raise Error(f"Command failed: \n # {command}\n{stderr[-2000:]}", proc.returncode)
    return output, proc.returncode


def do(*args, **kargs):
    """util.do: do_with_status's output."""
    return do_with_status(*args, **kargs)[0]


# ------------------------------------------------------------------ mounts.py


class BindMountPoint:
    """mounts.BindMountPoint(srcpath, bindpath, recursive=False, options=None)."""

    def __init__(self, srcpath, bindpath, recursive=False, options=None):
        self.mountsource, self.mountpath = srcpath, bindpath
        self.srcpath, self.bindpath = srcpath, bindpath
        self.recursive, self.options = recursive, options
        self.mounted = self.ismounted()

    def ismounted(self) -> bool:
        with open("/proc/mounts") as fh:
            return self.mountpath.rstrip("/") in [line.split()[1] for line in fh]

    def mount(self):
        if not self.mounted:
            mkdirIfAbsent(self.bindpath)
            bind = "--rbind" if self.recursive else "--bind"
            do(["/bin/mount", "-n", bind, self.srcpath, self.bindpath])
            if self.options:
                do(["/bin/mount", "-n", "-o", f"remount,{self.options}", self.bindpath])
        self.mounted = True
        return True

    def umount(self):
        if not self.mounted:
            return None
        try:
            do(["/bin/umount", "-n", *(["-l"] if self.recursive else []), self.bindpath])
        except Error:
            return False
        self.mounted = False
        return True


class Mounts:
    """mounts.Mounts: the mounts mock owns and the ones plugins add (essential mounts
    such as /proc are the test root's own business here)."""

    def __init__(self, rootObj):
        self.rootObj = rootObj
        self.managed_mounts: list = []
        self.user_mounts: list = []

    def add(self, mount):
        self.managed_mounts.append(mount)

    def add_user_mount(self, mount):
        self.user_mounts.append(mount)

    def mountall_user(self):
        for mount in self.user_mounts:
            mount.mount()

    def umountall(self, force=False, nowarn=False):
        for mount in reversed(self.managed_mounts + self.user_mounts):
            mount.umount()

    def get_mountpoints(self):
        return [m.mountpath for m in self.managed_mounts + self.user_mounts]


# ------------------------------------------------------------------ state, uid, plugins


@dataclass
class State:
    """state.State: ``result`` is set by the build ("success" or "fail") before
    postbuild; stages are started and finished."""

    bootstrap: bool = False
    result: str | None = None
    stages: list[str] = field(default_factory=list)

    def start(self, stage):
        self.stages.append(stage)

    def finish(self, stage):
        pass


class UidManager:
    """uid.UidManager: mock switches between root and the caller; the tests are root."""

    def becomeUser(self, uid, gid=None):
        pass

    def restorePrivs(self):
        pass


class Plugins:
    """plugin.Plugins(config, state)."""

    def __init__(self, config, state, honours_run_in_bootstrap=True):
        self.config = config
        self._hooks: dict[str, list] = {}
        self.state = state
        self.already_initialized = False
        self.plugins = config["plugins"]
        self.plugin_conf = config["plugin_conf"]
        self.plugin_dir = config["plugin_dir"]
        # mock >= 5.0 skips plugins with run_in_bootstrap = False in the bootstrap
        # buildroot; older mock initialises every enabled plugin there.
        self.honours_run_in_bootstrap = honours_run_in_bootstrap

    def init_plugins(self, buildroot):
        if self.already_initialized:
            return
        self.already_initialized = True
        for key in list(self.plugin_conf.keys()):
            if key.endswith("_opts"):
                self.plugin_conf[key]["basedir"] = buildroot.basedir
                self.plugin_conf[key]["cache_topdir"] = buildroot.cache_topdir
                self.plugin_conf[key]["cachedir"] = buildroot.cachedir
                self.plugin_conf[key]["root"] = buildroot.shared_root_name
                self.plugin_conf[key]["resultdir"] = buildroot.resultdir
        self.state.start("init plugins")
        for plugin in self.plugins:
            if not self.plugin_conf.get(f"{plugin}_enable"):
                continue
            spec = importlib.machinery.PathFinder.find_spec(plugin, [self.plugin_dir])
            if not spec:
                buildroot.root_log.warning(
                    "%s plugin is enabled in configuration but is not installed", plugin)
                continue
            # Loaded under a private name: the test process has its own hshelper.
            spec = importlib.util.spec_from_file_location(f"mock_plugin_{plugin}", spec.origin)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not hasattr(module, "requires_api_version"):
                raise Error(f'Plugin "{plugin}" doesn\'t specify required API version')
            if module.requires_api_version != CURRENT_API_VERSION:
                raise Error("Plugin version mismatch - requested = "
                            f"{module.requires_api_version}, current = {CURRENT_API_VERSION}")
            if (self.honours_run_in_bootstrap and buildroot.is_bootstrap
                    and not getattr(module, "run_in_bootstrap", True)):
                continue
            module.init(self, self.plugin_conf[f"{plugin}_opts"], buildroot)
        self.state.finish("init plugins")

    def call_hooks(self, stage, *args, **kwargs):
        required = kwargs.pop("required", False)
        hooks = self._hooks.get(stage, [])
        if required and not hooks:
            raise Error(f"Feature {stage} is not provided by any of enabled plugins")
        for hook in hooks:
            hook(*args, **kwargs)

    def add_hook(self, stage, function):
        hooks = self._hooks.get(stage, [])
        if function not in hooks:
            hooks.append(function)
            self._hooks[stage] = hooks


# ------------------------------------------------------------------ buildroot.py


class Buildroot:
    """buildroot.Buildroot(config, uid_manager, state, plugins, bootstrap_buildroot=None,
    is_bootstrap=False): the attributes plugins read, make_chroot_path, doChroot."""

    def __init__(self, config, uid_manager, state, plugins, bootstrap_buildroot=None,
                 is_bootstrap=False):
        self.config = config
        self.uid_manager = uid_manager
        self.state = state
        self.plugins = plugins
        self.bootstrap_buildroot = bootstrap_buildroot
        self.is_bootstrap = is_bootstrap
        self.shared_root_name = config["root"]
        self.root_name = config["root"]
        self.mockdir = config["basedir"]
        self.basedir = os.path.join(config["basedir"], config["root"])
        self.rootdir = config["rootdir"]
        if is_bootstrap:
            self.rootdir = os.path.join(self.basedir, "root")
        self.resultdir = config["resultdir"]
        if is_bootstrap:
            self.resultdir = os.path.join(self.basedir, "results")
        self.homedir = config["chroothome"]
        self.cache_topdir = config["cache_topdir"]
        self.cachedir = os.path.join(self.cache_topdir, self.shared_root_name)
        self.builddir = os.path.join(self.homedir, "build")
        self.chrootuid = config["chrootuid"]
        self.chrootuser = config["chrootuser"]
        self.chrootgid = config["chrootgid"]
        self.chrootgroup = config["chrootgroup"]
        self.env = config["environment"]
        self.env["HOME"] = self.homedir
        self.mounts = Mounts(self)
        self.root_log = logging.getLogger("mockbuild")
        self.build_log = logging.getLogger("mockbuild.Root.build")
        self.nosync_path = None
        self.plugins.init_plugins(self)

    def make_chroot_path(self, *paths):
        new_path = self.rootdir
        for path in paths:
            if path.startswith("/"):
                path = path[1:]
            new_path = os.path.join(new_path, path)
        return new_path

    def doChroot(self, command, nosync=False, *args, **kargs):
        """Execute given command in root. Returns (output, child.returncode)"""
        # (mock first removes stale rpmdb lock files of the chroot: none here.)
        env = dict(self.env)
        if nosync and self.nosync_path:
            env["LD_PRELOAD"] = self.nosync_path
        if USE_NSPAWN:
            kargs.setdefault("uid", os.getuid())
            kargs.setdefault("gid", os.getgid())
            self.uid_manager.becomeUser(0, 0)
        try:
            result = do_with_status(command, chrootPath=self.make_chroot_path(),
                                    env=env, *args, **kargs)  # noqa: B026 (as mock calls it)
        finally:
            if USE_NSPAWN:
                self.uid_manager.restorePrivs()
        return result

    def finish_init(self):
        """The end of Buildroot._init: the postinit hooks, then the user mounts."""
        self.plugins.call_hooks("postinit")
        self.mounts.mountall_user()

    def finalize(self):
        self.mounts.umountall()


def buildroots(config_opts: dict, honours_run_in_bootstrap=True) -> Buildroot:
    """mock.py's main(): a bootstrap buildroot (its own Plugins, a deep copy of
    plugin_conf, a copy of nspawn_args, '-bootstrap' added to the root name), then the
    buildroot. Returns the buildroot; its bootstrap is ``.bootstrap_buildroot``."""
    uid_manager = UidManager()
    state = State()
    plugins = Plugins(config_opts, state, honours_run_in_bootstrap)
    bootstrap_config = config_opts.copy()
    bootstrap_config["plugin_conf"] = copy.deepcopy(config_opts["plugin_conf"])
    bootstrap_config["root"] = bootstrap_config["root"] + "-bootstrap"
    bootstrap_config["nspawn_args"] = config_opts.get("nspawn_args", []).copy()
    bootstrap_state = State(bootstrap=True)
    bootstrap_plugins = Plugins(bootstrap_config, bootstrap_state, honours_run_in_bootstrap)
    bootstrap = Buildroot(bootstrap_config, uid_manager, bootstrap_state, bootstrap_plugins,
                          is_bootstrap=True)
    return Buildroot(config_opts, uid_manager, state, plugins, bootstrap)


# ------------------------------------------------------------------ config, modules


def config(rootdir, resultdir, basedir, plugin_dir, plugins=("bind_mount",)) -> dict:
    """The configuration keys the plugins and the stand-ins read, with mock's defaults
    (config.py) where mock has one."""
    return {
        "root": "standin-x86_64", "rootdir": str(rootdir), "resultdir": str(resultdir),
        "basedir": str(basedir), "cache_topdir": str(basedir / "cache"),
        "chroothome": "/builddir", "chrootuid": 65534, "chrootgid": 65534,
        "chrootuser": "mockbuild", "chrootgroup": "mock",
        "environment": {"TERM": "vt100", "SHELL": "/bin/bash", "HOME": "/builddir",
                        "HOSTNAME": "mock", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                        "LANG": "C.UTF-8"},
        "isolation": "auto", "nspawn_args": ["--capability=cap_ipc_lock"],
        "rpmbuild_networking": False,
        "plugins": list(plugins), "plugin_dir": str(plugin_dir),
        "plugin_conf": {"bind_mount_enable": True, "bind_mount_opts": {"dirs": []}},
    }


# The bind_mount plugin that ships with mock (plugins/bind_mount.py): each (host,
# chroot) pair of bind_mount_opts['dirs'] becomes a user mount; postinit makes the mount
# points. Written into the stand-in plugin directory beside the plugin under test.
BIND_MOUNT_PLUGIN = '''"""Stand-in for mock's bundled bind_mount plugin."""
import os

from mockbuild.mounts import BindMountPoint
from mockbuild.util import mkdirIfAbsent

requires_api_version = "1.1"


def init(plugins, conf, buildroot):
    BindMount(plugins, conf, buildroot)


class BindMount:
    def __init__(self, plugins, conf, buildroot):
        self.buildroot, self.bind_opts = buildroot, conf
        if conf.get("skip_bootstrap") and buildroot.is_bootstrap:
            return
        plugins.add_hook("postinit", self._create_dirs)
        for srcdir, destdir in conf["dirs"]:
            buildroot.mounts.add_user_mount(BindMountPoint(
                srcpath=srcdir, bindpath=buildroot.make_chroot_path(destdir)))

    def _create_dirs(self):
        for srcdir, destdir in self.bind_opts["dirs"]:
            path = self.buildroot.make_chroot_path(destdir)
            if os.path.isdir(srcdir):
                mkdirIfAbsent(path)
            else:
                open(path, "a").close()
'''


def plugin_dir(where, plugin_file) -> str:
    """A plugin directory as mock's: the plugin under test and the bind_mount stand-in."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(plugin_file, where / "hshelper.py")
    (where / "bind_mount.py").write_text(BIND_MOUNT_PLUGIN)
    return str(where)


def install(monkeypatch, use_nspawn: bool = False) -> None:
    """The stand-ins as the mockbuild package the plugin imports from."""
    monkeypatch.setattr(sys.modules[__name__], "USE_NSPAWN", use_nspawn)
    package = types.ModuleType("mockbuild")
    util = types.ModuleType("mockbuild.util")
    util.__getattr__ = lambda name: getattr(sys.modules[__name__], name)  # live USE_NSPAWN
    mounts = types.ModuleType("mockbuild.mounts")
    mounts.BindMountPoint, mounts.Mounts = BindMountPoint, Mounts
    exception = types.ModuleType("mockbuild.exception")
    exception.Error = Error
    package.util, package.mounts, package.exception = util, mounts, exception
    for name, module in (("mockbuild", package), ("mockbuild.util", util),
                         ("mockbuild.mounts", mounts), ("mockbuild.exception", exception)):
        monkeypatch.setitem(sys.modules, name, module)
    RUNS.clear()

"""Making the plugin manager: built-in plugins, entry points, local plugin files.

Blocked names (``-p no:NAME``, ``[plugins] disable``) are applied before anything loads,
so a blocked plugin's import side effects never happen. After loading,
``check_pending`` makes a misspelled hook name fail loudly instead of never being called.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from hshelper import hookspecs
from hshelper.errors import EXIT_FAILED, EXIT_USAGE, HshelperError

# Order matters: hooks run last-registered-first, and the merge of image contents follows
# registration, so the base comes first and what builds on it after.
BUILTIN = ("core", "kernel", "base", "disktools", "buildroot", "share9p", "mkimage", "disks",
           "loop", "devlinks", "accel", "heartbeat", "vmrun", "report", "recipes")
# Without these there is no image and no run at all.
ESSENTIAL = frozenset({"core", "kernel", "base"})

ENTRY_POINT_GROUP = "hshelper"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    origin: str  # "builtin", "entry point DIST", or a file path
    hooks: tuple[str, ...]


def _builtin_module(name: str) -> ModuleType:
    if name == "core":
        return importlib.import_module("hshelper.core")
    return importlib.import_module(f"hshelper.plugins.{name}")


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise HshelperError(f"plugin file {path} does not exist")
    mod_name = f"hshelper_local_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise HshelperError(f"plugin file {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise HshelperError(f"plugin file {path} failed to load: "
                            f"{type(exc).__name__}: {exc}") from exc
    return module


def _declared_anywhere(group: str) -> bool:
    """Whether an installed distribution may declare entry points of ``group``: a look
    at the entry_points.txt files of the dist-info and egg-info directories on sys.path
    (importing importlib.metadata and letting it scan costs 15 ms of every run, and
    hardly anyone has a third-party plugin). A sys.path entry that is not a directory
    (a zip file) counts as a maybe."""
    marker = f"[{group}]".encode()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except NotADirectoryError:
            return True
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                try:
                    with open(os.path.join(entry or ".", name, "entry_points.txt"), "rb") as fh:
                        if marker in fh.read():
                            return True
                except OSError:
                    continue
    return False


def _entry_points():
    if not _declared_anywhere(ENTRY_POINT_GROUP):
        return []
    from importlib.metadata import entry_points

    eps = entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, []))  # Python 3.9


class PluginHost:
    """The pluggy manager plus where each plugin came from."""

    def __init__(self, blocked: set[str] | frozenset[str] = frozenset(),
                 files: list[Path] | tuple[Path, ...] = (), entry_points: bool = True,
                 usage_names: set[str] | frozenset[str] = frozenset()):
        """``usage_names``: the blocked names that came from the command line (-p no:NAME),
        so that refusing one is a usage error (exit 2), not a config error."""
        def status(name: str) -> int:
            return EXIT_USAGE if name in usage_names else EXIT_FAILED

        refused = ESSENTIAL & set(blocked)
        if refused:
            name = sorted(refused)[0]
            raise HshelperError(f"plugin {name} cannot be disabled: "
                                "hshelper cannot build or run anything without it",
                                status=status(name))
        unknown = set(blocked) - set(BUILTIN)
        self.pm = pluggy.PluginManager("hshelper")
        self.pm.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}
        for name in blocked:
            self.pm.set_blocked(name)
        for name in BUILTIN:
            if name not in blocked:
                self._register(_builtin_module(name), name, "builtin")
        if entry_points:
            for ep in _entry_points():
                if ep.name in blocked:
                    unknown.discard(ep.name)
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise HshelperError(f"plugin {ep.name} (entry point {ep.value}) failed "
                                        f"to load: {type(exc).__name__}: {exc}") from exc
                dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
                self._register(plugin, ep.name, f"entry point of {dist}")
        for path in files:
            module = _load_file(path)
            self._register(module, path.stem, str(path))
        if unknown:
            name = sorted(unknown)[0]
            raise HshelperError(f"cannot disable unknown plugin {name} "
                                f"(known: {', '.join(self.names())})", status=status(name))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise HshelperError(f"plugin error: {exc}") from exc

    def _register(self, plugin: object, name: str, origin: str) -> None:
        if self.pm.get_plugin(name) is not None:
            raise HshelperError(f"two plugins are named {name} ({self.origins[name]} and {origin})")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise HshelperError(f"plugin {name} ({origin}): {exc}") from exc
        self.origins[name] = origin

    @property
    def hook(self):
        return self.pm.hook

    def names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin() if name in self.origins]

    def info(self) -> list[PluginInfo]:
        out = []
        for name in self.names():
            plugin = self.pm.get_plugin(name)
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            out.append(PluginInfo(name, self.origins[name], hooks))
        return out

    def plugin_of(self, exc: BaseException) -> str | None:
        """The name of the plugin whose code raised ``exc`` (deepest frame wins)."""
        files = {}
        for name in self.names():
            plugin = self.pm.get_plugin(name)
            path = getattr(plugin, "__file__", None)
            if path:
                files[str(Path(path).resolve())] = name
        found = None
        tb = exc.__traceback__
        while tb is not None:
            found = files.get(str(Path(tb.tb_frame.f_code.co_filename).resolve()), found)
            tb = tb.tb_next
        return found

"""Layered TOML configuration into a frozen value, with the origin of every setting.

Layers, later winning: built-in defaults < /etc/hshelper/config.toml < the user's
($XDG_CONFIG_HOME/hshelper/config.toml) < ./hshelper.toml < environment
(HSHELPER_SECTION_KEY) < command line. Keys are declared by whoever reads them (core and
plugins, via ``hshelper_config_keys``); an undeclared key is an error naming the file and
suggesting the nearest declared one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hshelper.errors import EXIT_FAILED, EXIT_USAGE, HshelperError
from hshelper.sizes import UNIT_NAMES, parse_size


def _loads(text: str) -> dict:
    """TOML text as a dict; raises _TomlError. The parser is imported here, when there
    is a file to read (4 ms of every run's start otherwise)."""
    if sys.version_info >= (3, 11):
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _TomlError(str(exc)) from exc
    import toml  # pragma: no cover - exercised on RHEL 9's Python 3.9

    try:  # pragma: no cover
        return toml.loads(text)
    except toml.TomlDecodeError as exc:  # pragma: no cover
        raise _TomlError(str(exc)) from exc


class _TomlError(Exception):
    """A TOML file that does not parse (from tomllib or, before Python 3.11, toml)."""


@dataclass(frozen=True)
class Key:
    """A declared configuration key.

    ``type`` is one of str, int, float, bool, list (of strings); ``choices`` closes a
    str key to a set of values. An int key with a ``unit`` (in bytes) is a size: text
    takes the options' units (``"1G"``, ``"768M"``; a bare number is in ``unit``).
    ``minimum`` bounds a number from below.
    """

    section: str
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    unit: int = 0
    minimum: float | None = None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return f"HSHELPER_{self.section}_{self.name}".upper().replace("-", "_")


@dataclass(frozen=True)
class Layer:
    """One source of settings: ``values`` maps "section.key" to a raw value. A bad value
    in a ``usage`` layer (the command line) is a usage error, exit 2."""

    origin: str
    values: dict[str, Any]
    usage: bool = False


SYSTEM_FILE = Path("/etc/hshelper/config.toml")
LOCAL_FILE = "hshelper.toml"


def default_layer_paths(cwd: Path | None = None) -> list[Path]:
    """The config files looked for, in the order they are read (later ones win): the
    system's, the user's ($XDG_CONFIG_HOME, else ~/.config) and the working directory's."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.environ.get("HOME") or "/nonexistent", ".config")
    return [SYSTEM_FILE, Path(xdg) / "hshelper" / "config.toml",
            (cwd or Path.cwd()) / LOCAL_FILE]


def read_toml_layer(path: Path) -> Layer | None:
    """A config file as a flat layer; None when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HshelperError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        data = _loads(text)
    except _TomlError as exc:
        raise HshelperError(f"{path}: TOML syntax error: {exc}") from exc
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise HshelperError(f"{path}: '{section}' must be a [section], "
                                f"e.g. [image] then {section} = ...")
        for name, value in table.items():
            values[f"{section}.{name}"] = value
    return Layer(str(path), values)


def env_layer(keys: list[Key], environ: dict[str, str] | None = None) -> Layer:
    environ = os.environ if environ is None else environ
    return Layer("environment", {k.dotted: environ[k.env] for k in keys if k.env in environ})


def _coerce(key: Key, value: Any, origin: str) -> Any:
    def bad(expected: str) -> HshelperError:
        return HshelperError(f"{origin}: {key.dotted} must be {expected}, got {value!r}")

    from_text = isinstance(value, str) and key.type is not str
    if key.type is bool:
        if from_text:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key.type in (int, float):
        number = _number(key, value, bad)
        if key.minimum is not None and number < key.minimum:
            raise bad(f"at least {key.minimum:g}")
        return number
    if key.type is list:
        if from_text:
            return [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    if not isinstance(value, str):
        raise bad("a string")
    if key.choices and value not in key.choices:
        raise bad("one of " + ", ".join(key.choices))
    return value


def _number(key: Key, value: Any, bad) -> int | float:
    if isinstance(value, str) and key.unit:
        try:
            return parse_size(value, default_unit=key.unit, unit=key.unit)
        except HshelperError as exc:
            raise bad(f"a size (e.g. 1G, 768M; a bare number is in "
                      f"{UNIT_NAMES.get(key.unit, key.unit)})") from exc
    if isinstance(value, str):
        try:
            return key.type(value)
        except ValueError as exc:
            raise bad(f"a number ({key.type.__name__})") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"a number ({key.type.__name__})")
    if key.type is int and isinstance(value, float) and not value.is_integer():
        raise bad("a whole number")
    return key.type(value)


class Config:
    """The effective configuration: ``get("section", "key")``, ``origin(...)``."""

    def __init__(self, keys: list[Key], layers: list[Layer]):
        self.keys = {k.dotted: k for k in keys}
        self.layers = tuple(layers)
        self._values: dict[str, Any] = {}
        self._origins: dict[str, str] = {}
        for key in keys:
            self._values[key.dotted] = key.default
            self._origins[key.dotted] = "default"
        for layer in layers:
            for dotted, raw in layer.values.items():
                key = self.keys.get(dotted)
                status = EXIT_USAGE if layer.usage else EXIT_FAILED
                if key is None:
                    import difflib  # only for a mistyped key

                    near = difflib.get_close_matches(dotted, self.keys, n=1)
                    hint = f"; did you mean {near[0]}?" if near else ""
                    raise HshelperError(f"{layer.origin}: unknown config key {dotted}{hint}",
                                        status=status)
                try:
                    self._values[dotted] = _coerce(key, raw, layer.origin)
                except HshelperError as exc:
                    exc.status = status
                    raise
                self._origins[dotted] = layer.origin

    def with_layer(self, layer: Layer) -> Config:
        """A new Config with ``layer`` on top (for values a command derives itself)."""
        return Config(list(self.keys.values()), [*self.layers, layer])

    def get(self, section: str, name: str) -> Any:
        return self._values[f"{section}.{name}"]

    def origin(self, section: str, name: str) -> str:
        return self._origins[f"{section}.{name}"]

    def items(self) -> list[tuple[str, Any, str]]:
        return [(d, self._values[d], self._origins[d]) for d in sorted(self._values)]

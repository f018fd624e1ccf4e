"""Layered configuration: precedence, provenance, and errors that name file and key."""

from __future__ import annotations

import pytest

from hshelper.config import Config, Key, Layer, env_layer, read_toml_layer
from hshelper.errors import HshelperError

KEYS = [Key("run", "memory", int, 0, "mem"), Key("run", "mode", str, "image", "m",
                                                  ("image", "root")),
        Key("image", "programs", list, [], "p"), Key("accel", "probe_timeout", float, 3.0, "t"),
        Key("x", "flag", bool, False, "f")]


def test_precedence_and_origin(tmp_path):
    etc = tmp_path / "etc.toml"
    etc.write_text("[run]\nmemory = 256\nmode = 'root'\n")
    local = tmp_path / "hshelper.toml"
    local.write_text("[run]\nmemory = 300\n")
    env = env_layer(KEYS, {"HSHELPER_RUN_MEMORY": "400", "HSHELPER_X_FLAG": "yes"})
    config = Config(KEYS, [read_toml_layer(etc), read_toml_layer(local), env,
                           Layer("command line", {"image.programs": ["sfdisk"]})])
    assert config.get("run", "memory") == 400 and config.origin("run", "memory") == "environment"
    assert config.get("run", "mode") == "root" and config.origin("run", "mode") == str(etc)
    assert config.get("x", "flag") is True
    assert config.get("image", "programs") == ["sfdisk"]
    assert config.origin("accel", "probe_timeout") == "default"


def test_unknown_key_suggests(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[run]\nmemroy = 1\n")
    with pytest.raises(HshelperError, match=r"c.toml: unknown config key run.memroy; did you "
                                             r"mean run.memory\?"):
        Config(KEYS, [read_toml_layer(f)])


def test_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[run]\nmemory = = 3\n")
    with pytest.raises(HshelperError, match=r"c.toml: TOML syntax error.*line 2"):
        read_toml_layer(f)


@pytest.mark.parametrize("raw", ["lots", True, 1.5])
def test_wrong_type(raw):
    with pytest.raises(HshelperError, match="run.memory must be"):
        Config(KEYS, [Layer("here", {"run.memory": raw})])


def test_closed_choice():
    with pytest.raises(HshelperError, match="one of image, root"):
        Config(KEYS, [Layer("here", {"run.mode": "vm"})])

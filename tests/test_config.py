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


# ------------------------------------------------------------------ sizes, bounds

SIZES = [Key("run", "memory", int, 0, "mem", unit=2**20, minimum=0),
         Key("image", "budget", int, 1024, "kib", unit=2**10, minimum=0),
         Key("run", "timeout", float, 0.0, "s", minimum=0)]


@pytest.mark.parametrize("raw,mib", [("1G", 1024), ("768M", 768), ("1.5G", 1536),
                                     ("512", 512), (512, 512), ("2GiB", 2048), (0, 0)])
def test_a_size_key_takes_the_options_units(raw, mib):
    assert Config(SIZES, [Layer("here", {"run.memory": raw})]).get("run", "memory") == mib


def test_a_size_key_in_kib():
    assert Config(SIZES, [Layer("here", {"image.budget": "2M"})]).get("image", "budget") == 2048


@pytest.mark.parametrize("dotted,raw,message", [
    ("run.memory", "lots", "run.memory must be a size"),
    ("run.memory", "1.5K", "run.memory must be a size"),  # not a whole MiB
    ("run.memory", -1, "run.memory must be at least 0"),
    ("run.timeout", "-5", "run.timeout must be at least 0"),
])
def test_bad_sizes_and_bounds_name_the_key(dotted, raw, message):
    with pytest.raises(HshelperError, match=message) as info:
        Config(SIZES, [Layer("here", {dotted: raw})])
    assert info.value.status == 125  # a config layer: the setup's error


def test_the_command_lines_layer_makes_usage_errors():
    with pytest.raises(HshelperError) as info:
        Config(SIZES, [Layer("command line", {"run.memory": "lots"}, usage=True)])
    assert info.value.status == 2
    with pytest.raises(HshelperError, match="unknown config key") as info:
        Config(SIZES, [Layer("command line", {"run.memroy": "1G"}, usage=True)])
    assert info.value.status == 2


# ------------------------------------------------------------------ every closed choice works

def _choices():
    from hshelper.cli import Session

    keys = Session(["true"], "helper-run").keys
    return [(key.dotted, value) for key in keys if key.choices for value in key.choices]


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.parametrize("dotted,value", _choices(), ids=lambda x: str(x))
def test_every_value_a_closed_key_accepts_works(root, dotted, value):
    """Each value config.Key.choices lets through runs for real (lz4 was accepted once,
    then ended in an internal error)."""
    import chroot

    proc = chroot.run(root, ["helper-run", "--set", f"{dotted}={value}", "sh", "-c",
                             "echo works"])
    assert (proc.returncode, proc.stdout) == (0, b"works\n"), proc.stderr.decode()
    if dotted == "image.compression":
        import json

        built = chroot.run(root, ["hshelper", "build", "--json", "--set",
                                  f"{dotted}={value}"])
        made = json.loads(built.stdout)["compression"]
        assert made == value or (value == "auto" and made in ("zstd", "gzip", "xz"))


def test_every_key_is_documented():
    from pathlib import Path

    from hshelper.cli import Session

    docs = (Path(__file__).resolve().parent.parent / "docs/configuration.md").read_text()
    table = docs.split("## Keys", 1)[1]
    keys = Session(["true"], "helper-run").keys
    assert [k.dotted for k in keys if f"| `{k.dotted}` |" not in table] == []
    for key in keys:
        if key.choices:
            row = next(line for line in table.splitlines() if f"`{key.dotted}`" in line)
            assert all(f"`{choice}`" in row for choice in key.choices), key.dotted

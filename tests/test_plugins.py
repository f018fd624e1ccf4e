"""The plugin contract for real: a local plugin file from hshelper.toml, a third-party
plugin installed into a virtualenv through the entry point, disabling built-ins, and
bad configurations that must end in one clear line and exit 125."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import chroot
import pytest

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parent.parent
EXAMPLE = SRC / "docs/examples/stamp.py"


def in_root(root: Path, name: str) -> tuple[str, Path]:
    guest = chroot.fresh_dir(root, name)
    return guest, root / guest.lstrip("/")


@pytest.mark.vm
def test_local_plugin_from_hshelper_toml(root):
    """docs/examples/stamp.py, named in ./hshelper.toml: its setup step runs before the
    payload, and the file it puts into the image is there."""
    guest, host = in_root(root, "localplugin")
    shutil.copy(EXAMPLE, host / "stamp.py")
    (host / "hshelper.toml").write_text('[plugins]\nload = ["stamp.py"]\n')
    proc = chroot.run(root, ["helper-run", "sh", "-c",
                             "cat /run/stamp /etc/hshelper-example"], cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "prepared for: sh\nbuilt with stamp.py\n"
    listed = chroot.run(root, ["hshelper", "plugins"], cwd=guest).stdout.decode()
    assert "stamp" in listed and "hshelper_guest_setup" in listed


def manifest_paths(root: Path, guest: str, *extra: str) -> set[str]:
    proc = chroot.run(root, ["hshelper", "build", "--json", *extra], cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    manifest = root / json.loads(proc.stdout)["initrd"].lstrip("/")
    lines = manifest.with_name("manifest.json").read_text().splitlines()
    return {json.loads(line)["path"] for line in lines}


def test_disabling_by_config_and_the_essential_plugins(root):
    """[plugins] disable in ./hshelper.toml drops a plugin's contributions as -p no: does;
    core, kernel and base refuse to go, in one line, exit 2."""
    guest, host = in_root(root, "disable-config")
    (host / "hshelper.toml").write_text('[plugins]\ndisable = ["disktools"]\n')
    assert "/usr/sbin/sfdisk" not in manifest_paths(root, guest)
    for name in ("core", "kernel", "base"):
        proc = chroot.run(root, ["hshelper", "build", "-p", f"no:{name}"], cwd=guest)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert f"plugin {name} cannot be disabled" in err and len(err.splitlines()) == 1, err


def test_disabling_a_builtin_changes_the_image(root):
    guest, _ = in_root(root, "disable")
    full = manifest_paths(root, guest)
    without = manifest_paths(root, guest, "-p", "no:disktools")
    assert "/usr/sbin/sfdisk" in full and "/usr/sbin/sfdisk" not in without
    assert "/usr/sbin/mkfs.ext4" in full and "/usr/sbin/mkfs.ext4" not in without
    loopless = manifest_paths(root, guest, "-p", "no:loop")
    assert "/hshelper/modules/loop.ko" in full and "/hshelper/modules/loop.ko" not in loopless


@pytest.mark.vm
def test_disabling_a_builtin_changes_the_qemu_command_line(root):
    guest, _ = in_root(root, "disable-run")
    shared = chroot.run(root, ["helper-run", "-v", "true"], cwd=guest)
    unshared = chroot.run(root, ["helper-run", "-v", "-p", "no:share9p", "true"], cwd=guest)
    assert shared.returncode == 0 and unshared.returncode == 0, unshared.stderr.decode()

    def qemu_line(proc) -> str:
        return next(line for line in proc.stderr.decode().splitlines()
                    if line.startswith("hshelper: qemu: "))

    assert "virtio-9p-pci" in qemu_line(shared)
    assert "virtio-9p-pci" not in qemu_line(unshared)


PLUGIN_PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "hshelper-testplugin"
        version = "1.0"

        [project.entry-points.hshelper]
        testplugin = "hshelper_testplugin"
        """,
    "hshelper_testplugin.py": '''
        """A third-party plugin: one program in the image, one device in the VM."""
        from hshelper.hookspecs import hookimpl
        from hshelper.model import Contents, File

        TOOL = b"#!/bin/sh\\necho third-party tool ran\\n"


        @hookimpl
        def hshelper_image_contents():
            return Contents(files=(File("/usr/bin/thirdparty-tool", data=TOOL,
                                        mode=0o755),))


        @hookimpl
        def hshelper_qemu_args():
            return ["-device", "virtio-rng-pci"]
        ''',
}


@pytest.mark.vm
def test_entry_point_plugin_in_a_virtualenv(bookworm, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(SRC)], check=True)
    package = tmp_path / "plugin"
    package.mkdir()
    for name, text in PLUGIN_PACKAGE.items():
        (package / name).write_text(textwrap.dedent(text).lstrip())
    subprocess.run([*pip, str(package)], check=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    listed = subprocess.run([str(venv / "bin/hshelper"), "plugins"], capture_output=True,
                            text=True, env=env)
    assert "testplugin" in listed.stdout and "entry point" in listed.stdout, listed.stderr
    # 1af4:1005 is virtio-rng (transitional): the device the plugin added.
    script = ("thirdparty-tool && grep -l 0x1005 /sys/bus/pci/devices/*/device >/dev/null "
              "&& echo rng-device-present")
    proc = subprocess.run([str(venv / "bin/helper-run"), "--sysroot", str(bookworm),
                           "--accel", "tcg", "--no-share-cwd", "sh", "-c", script],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "third-party tool ran\nrng-device-present\n"


BAD_CONFIGS = {
    "syntax": ("[image]\nprograms = [\n", "TOML syntax error"),
    "unknown-key": ("[image]\ncompresion = 'gzip'\n", "compression"),
    "wrong-type": ("[run]\nmemory = 'lots'\n", "run.memory"),
    "missing-plugin": ('[plugins]\nload = ["nowhere.py"]\n', "nowhere.py does not exist"),
    "raising-plugin": ('[plugins]\nload = ["broken.py"]\n',
                       "internal error in plugin broken: RuntimeError: this plugin is broken "
                       "on purpose"),
}
BROKEN_PLUGIN = """
from hshelper.hookspecs import hookimpl

@hookimpl
def hshelper_image_contents():
    raise RuntimeError("this plugin is broken on purpose")
"""


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configuration_is_one_line_and_125(bookworm, case):
    text, expected = BAD_CONFIGS[case]
    guest, host = in_root(bookworm, f"badconfig-{case}")
    (host / "hshelper.toml").write_text(text)
    (host / "broken.py").write_text(BROKEN_PLUGIN)
    proc = chroot.run(bookworm, ["hshelper", "build"], cwd=guest)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err

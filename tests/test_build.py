"""`hshelper build` against real build roots: every layout, read back independently,
booted for real, as the unprivileged build user inside the chroot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chroot
import pytest

from hshelper import initrd

pytestmark = pytest.mark.slow

ROOTS = ["bookworm", "bookworm-nobusybox", "bookworm-612", "bookworm-cloud", "fedora-layout"]


def build_json(root: Path, *extra: str, uid: int = chroot.BUILD_UID, env=None) -> dict:
    proc = chroot.run(root, ["hshelper", "build", "--json", *extra], uid=uid, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def host_path(root: Path, guest: str) -> Path:
    return root / guest.lstrip("/")


@pytest.mark.parametrize("name", ROOTS)
def test_build_as_build_user_then_cache_hit(root_factory, name):
    root = root_factory(name)
    cache = chroot.fresh_dir(root, "cache-" + name)
    env = {"XDG_CACHE_HOME": cache}
    first = build_json(root, env=env)
    second = build_json(root, env=env)
    assert not first["cached"] and second["cached"]
    assert first["initrd"] == second["initrd"]
    initrd = host_path(root, first["initrd"])
    assert initrd.stat().st_uid == chroot.BUILD_UID  # made by the build user, no root
    assert "virtio_console" in first["features"] and "ext4" in first["features"]
    if name == "bookworm-cloud":
        assert "9p" not in first["features"]
        assert any("9p" in m for m in first["missing"])
    else:
        assert {"9p", "9pnet_virtio"} <= set(first["features"])


@pytest.mark.parametrize("name", ["bookworm", "bookworm-nobusybox", "fedora-layout"])
def test_archive_matches_manifest(root_factory, name, tmp_path):
    """bsdtar (an independent reader) lists exactly what the manifest says."""
    root = root_factory(name)
    out = tmp_path / "out"
    proc = subprocess.run([sys_hshelper(), "build", "--sysroot", str(root), "--output",
                           str(out), "--compression", "gzip", "--json"],
                          capture_output=True, env=host_env(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    manifest = [json.loads(line) for line in (out / "manifest.json").read_text().splitlines()]
    initrd = next(out.glob("initrd-*.img"))
    listing = subprocess.run(["bsdtar", "-tvf", str(initrd)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    listed = {}
    for line in listing:
        fields = line.split()
        name_field = fields[8] if len(fields) > 8 else fields[-1]
        listed["/" + name_field] = line[0]
    expected = {m["path"]: {"directory": "d", "file": "-", "symlink": "l",
                            "char-device": "c", "block-device": "b"}[m["type"]]
                for m in manifest}
    assert listed == expected
    assert listed["/dev/console"] == "c" and listed["/init"] == "-"
    assert any(p.startswith("/hshelper/modules/") for p in listed)
    assert (out / initrd.name.replace("initrd", "vmlinuz").replace(".img", "")).exists()


BOOT_CHECK = """
echo "MARKER loaded: $(cut -d' ' -f1 /proc/modules | tr '\\n' ' ')"
truncate -s 32M /tmp/fs.img && mkfs.ext4 -q /tmp/fs.img && mkdir -p /mnt/t &&
mount -o loop /tmp/fs.img /mnt/t && echo MOUNTED-EXT4-ON-LOOP
"""


@pytest.mark.vm
@pytest.mark.parametrize("name", ROOTS)
def test_every_image_boots_and_loads_its_modules(root_factory, name, tmp_path):
    """Boot each root's image (host qemu, TCG): the init loads the boot modules (the
    output arrives through virtio_console), and mounting ext4 on a loop device makes the
    guest kernel load ext4, loop and their dependencies on demand, from .ko, .ko.xz,
    with and without modules.dep."""
    root = root_factory(name)
    proc = subprocess.run([str(Path(sys_hshelper()).with_name("helper-run")), "--sysroot",
                           str(root), "--accel", "tcg", "--no-share-cwd", "sh", "-c",
                           BOOT_CHECK], capture_output=True, env=host_env(tmp_path),
                          timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "MARKER loaded:" in out and "MOUNTED-EXT4-ON-LOOP" in out
    loaded = out.split("MARKER loaded:")[1].split("\n")[0].split()
    config = (root / "boot").glob("config-*") if name != "fedora-layout" else \
        (root / "usr/lib/modules").glob("*/config")
    text = next(config).read_text()
    if "CONFIG_BLK_DEV_LOOP=m" in text:
        assert "loop" not in loaded  # not at boot: on demand, when mount asked for it
    # Whatever the kernel's compression (xz in 6.1, zstd in 6.12, lz4 in the cloud
    # flavour), it was unpacked and booted through its PVH entry.
    info = subprocess.run([str(Path(sys_hshelper())), "info", "--sysroot", str(root)],
                          capture_output=True, text=True, env=host_env(tmp_path), timeout=120)
    boot = [line for line in info.stdout.splitlines() if line.startswith("boot kernel:")]
    assert len(boot) == 1 and "/vmlinux (" in boot[0] and "PVH entry" in boot[0], info.stdout


def test_same_inputs_same_bytes(bookworm, tmp_path):
    images = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        env = host_env(tmp_path / f"c{n}")
        env["SOURCE_DATE_EPOCH"] = "1700000000"
        subprocess.run([sys_hshelper(), "build", "--sysroot", str(bookworm), "--output",
                        str(out)], check=True, env=env, capture_output=True)
        images.append(next(out.glob("initrd-*.img")).read_bytes())
    assert images[0] == images[1]


def test_fedora_layout_has_no_depfile_and_xz_modules(root_factory):
    root = root_factory("fedora-layout")
    moddirs = list((root / "usr/lib/modules").iterdir())
    assert not any((d / "modules.dep").exists() for d in moddirs)
    assert not list((root / "boot").glob("vmlinuz-*"))
    assert list(moddirs[0].rglob("*.ko.xz"))
    data = build_json(root)
    assert "9p" in data["features"] and data["kernel"].endswith("/vmlinuz")


def test_no_kernel_is_exit_125_with_paths_and_package(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('ID=debian\n')
    proc = subprocess.run([sys_hshelper(), "build", "--sysroot", str(tmp_path)],
                          capture_output=True, text=True, env=host_env(tmp_path))
    assert proc.returncode == 125
    assert "/boot/vmlinuz-VERSION" in proc.stderr and "/usr/lib/modules/VERSION/vmlinuz" in \
        proc.stderr
    assert "linux-image-amd64" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_kernel_says_how_to_fix(bookworm, tmp_path):
    kernel = next((bookworm / "boot").glob("vmlinuz-*"))
    mode = kernel.stat().st_mode
    try:
        kernel.chmod(0o600)
        proc = chroot.run(bookworm, ["hshelper", "build"])
        assert proc.returncode == 125
        err = proc.stderr.decode()
        assert "not readable" in err and "chmod a+r" in err
        assert f"/boot/{kernel.name}" in err  # the file to fix, by its name in the root
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    finally:
        kernel.chmod(mode)


def test_missing_required_module_named(bookworm, tmp_path):
    proc = chroot.run(bookworm, ["hshelper", "build", "--module", "no_such_module_xyz"])
    assert proc.returncode == 125
    assert "no_such_module_xyz" in proc.stderr.decode()


def sys_hshelper() -> str:
    """The hshelper script of the interpreter running the tests (the venv's)."""
    beside = Path(sys.executable).parent / "hshelper"
    found = str(beside) if beside.exists() else shutil.which("hshelper")
    assert found, "hshelper is not installed on the host (pip install -e .)"
    return found


def host_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cache)
    return env


def test_a_change_to_hshelper_or_its_plugins_changes_the_code_digest(tmp_path):
    """Plans and saved states are keyed by hshelper's code, built-in plugins included
    (a checkout keeps them in plugins/, beside the package)."""
    package, plugins = tmp_path / "hshelper", tmp_path / "plugins"
    (package / "guest").mkdir(parents=True)
    plugins.mkdir()
    (package / "core.py").write_text("x = 1\n")
    (package / "guest/init").write_text("#!/bin/sh\n")
    (plugins / "disks.py").write_text("y = 1\n")
    tree = {"hshelper": package, "hshelper.plugins": plugins}
    first = initrd.tree_digest(tree)
    assert initrd.tree_digest(tree) == first
    for path, text in ((plugins / "disks.py", "y = 2\n"),
                       (package / "guest/init", "#!/bin/sh\n:\n"),
                       (package / "core.py", "x = 2\n")):
        path.write_text(text)
        changed = initrd.tree_digest(tree)
        assert changed != first, path
        first = changed

"""The image recipes (recipes/*.sh) end to end: a Debian root made by mmdebstrap goes
through ``helper-run recipes/mkimage.sh`` as the build user in a build root; the image
is checked on the host with sfdisk, fsck, debugfs, mtools and blkid, then booted under
TCG (OVMF for UEFI, SeaBIOS for MBR) until the marker init prints on the console."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import buildroots
import chroot
import imagecheck
import pytest
from hshelper.plugins import recipes as plugin

from hshelper import recipes as recipe_files
from hshelper.errors import HshelperError
from hshelper.guestrun import quote

# Tests in the build root (VMs) are marked slow and vm; the others run anywhere.

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
MARKER_APPEND = "init=/usr/local/sbin/marker"
SRC_DIR = "/home/builder/recipe-src"


def put_target_tar(build_root: Path) -> str:
    """The target Debian root (kernel, initrd, bootloaders) as a tarball the build user
    can read, inside ``build_root``; returns its path there."""
    target = buildroots.ensure_root("target-bookworm")
    host_dir = build_root / SRC_DIR.lstrip("/")
    host_dir.mkdir(parents=True, exist_ok=True)
    os.chown(host_dir, chroot.BUILD_UID, chroot.BUILD_UID)
    tar = imagecheck.target_tarball(target, host_dir / "root.tar")
    os.chown(tar, chroot.BUILD_UID, chroot.BUILD_UID)
    return f"{SRC_DIR}/root.tar"


@pytest.fixture(scope="session")
def target_tar(bookworm) -> str:
    return put_target_tar(bookworm)


# What the marker boot needs not: device and network drivers (the initrd has its own),
# filesystems but fat and nls (the ESP), documentation, the hardware database, perl,
# GRUB's tools and BIOS modules, caches. A smaller tarball is filled faster in the guest.
SLIM = ("./usr/lib/modules/*/kernel/drivers", "./usr/lib/modules/*/kernel/net",
        "./usr/lib/modules/*/kernel/sound", "./usr/lib/modules/*/kernel/arch",
        "./usr/lib/modules/*/kernel/fs/[!fn]*", "./usr/share", "./usr/lib/udev",
        "./usr/lib/x86_64-linux-gnu/perl*", "./usr/lib/x86_64-linux-gnu/libperl*",
        "./usr/lib/x86_64-linux-gnu/gconv", "./usr/lib/grub/i386-pc", "./usr/bin/grub-*",
        "./usr/sbin/grub-*", "./usr/bin/perl*", "./var/cache", "./var/lib/apt")


@pytest.fixture(scope="session")
def slim_tar(bookworm) -> str:
    """The target root as a bootable tarball without what the marker boot needs not."""
    target = buildroots.ensure_root("target-bookworm")
    host_dir = bookworm / SRC_DIR.lstrip("/")
    host_dir.mkdir(parents=True, exist_ok=True)
    os.chown(host_dir, chroot.BUILD_UID, chroot.BUILD_UID)
    tar = imagecheck.target_tarball(target, host_dir / "slim.tar", SLIM)
    os.chown(tar, chroot.BUILD_UID, chroot.BUILD_UID)
    return f"{SRC_DIR}/slim.tar"


def workdir(root: Path, name: str) -> tuple[str, Path]:
    """A fresh directory for the build user with the recipes copied in, as a packager's
    source tree would have them."""
    guest = chroot.fresh_dir(root, name)
    host = root / guest.lstrip("/")
    shutil.copytree(chroot.SRC / "recipes", host / "recipes",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    for path in [host / "recipes", *(host / "recipes").iterdir()]:
        os.chown(path, chroot.BUILD_UID, chroot.BUILD_UID)
    return guest, host


def helper_run(root, *argv, cwd, timeout=1200, **kwargs):
    return chroot.run(root, ["helper-run", *argv], cwd=cwd, timeout=timeout, **kwargs)


def leftovers(host: Path) -> list[str]:
    return sorted(p.name for p in host.iterdir() if p.name != "recipes")


def build_image(root: Path, tar: str, name: str, recipe: str, *options: str) -> Path:
    """Run ``recipe`` on the target tarball (a read-only disk) into a 1 GiB disk.img;
    returns the image's host path after checking that nothing else was left behind."""
    guest, host = workdir(root, name)
    proc = helper_run(root, "--disk", f"{tar},ro,name=src",
                      "--disk", "disk.img.part,size=1G,name=out",
                      f"recipes/{recipe}", *options, "--append", MARKER_APPEND,
                      "/dev/disk/hshelper/src", "disk.img", cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    assert leftovers(host) == ["disk.img"]
    return host / "disk.img"


def check_esp_and_root(image: Path, tmp: Path, fstype: str = "ext4") -> dict:
    """The GPT layout and both filesystems, checked on the host; returns what was found."""
    lay = imagecheck.layout(image)
    assert lay.label == "gpt"
    esp, rootp = lay.partitions
    assert esp.type == ESP_TYPE and esp.name == "esp"
    assert rootp.type == ROOT_X86_64_TYPE and rootp.name == "root"
    esp_img = imagecheck.extract(image, esp, tmp / "esp.img")
    root_img = imagecheck.extract(image, rootp, tmp / "root.img")
    for part, kind in ((esp_img, "vfat"), (root_img, fstype)):
        proc = imagecheck.fsck(part, kind)
        assert proc.returncode == 0, (kind, proc.stdout, proc.stderr)
    esp_fs, root_fs = imagecheck.probe(esp_img), imagecheck.probe(root_img)
    assert esp_fs["TYPE"] == "vfat" and esp_fs.get("VERSION") == "FAT32"
    assert root_fs["TYPE"] == fstype
    fstab = imagecheck.ext_cat(root_img, "/etc/fstab")
    assert f"UUID={root_fs['UUID']} / {fstype} " in fstab
    assert f"UUID={esp_fs['UUID']} /boot/efi vfat " in fstab
    assert imagecheck.ext_exists(root_img, "/usr/bin/dpkg")
    assert imagecheck.ext_exists(root_img, "/" + imagecheck.MARKER_PATH)
    assert "BOOTX64.EFI" in imagecheck.fat_ls(esp_img, "/EFI/BOOT")
    return {"esp": esp_img, "root": root_img, "layout": lay, "root_fs": root_fs}


def check_boot(image: Path, firmware: str, log: Path, partuuid: str) -> list[str]:
    console = imagecheck.boot(image, firmware, log)
    lines = imagecheck.marker_lines(console)
    assert any(line.endswith("done") for line in lines), console[-3000:]
    cmdline = next(line for line in lines if " cmdline " in line)
    assert f"root=PARTUUID={partuuid}" in cmdline
    assert any(" root /dev/vda" in line for line in lines), lines
    return lines


@pytest.mark.slow
@pytest.mark.vm
def test_gpt_systemd_boot_image_boots_with_uefi(root, target_tar, tmp_path):
    image = build_image(root, target_tar, "mkimage-gpt", "mkimage.sh")
    assert image.stat().st_uid == chroot.BUILD_UID
    assert image.stat().st_size == 2**30
    found = check_esp_and_root(image, tmp_path)
    rootp = found["layout"].partitions[1]
    entry = imagecheck.fat_cat(found["esp"], "/loader/entries/linux.conf")
    assert f"root=PARTUUID={rootp.uuid.lower()}" in entry
    kernels = imagecheck.fat_ls(found["esp"], "/")
    version = next(k for k in kernels if k[0].isdigit())
    assert imagecheck.fat_ls(found["esp"], f"/{version}") == ["initrd", "linux"]
    lines = check_boot(image, "uefi", tmp_path / "console.log", rootp.uuid.lower())
    assert any(line.endswith("esp BOOTX64.EFI") for line in lines), lines


@pytest.mark.slow
@pytest.mark.vm
def test_bad_root_fails_cleanly(root, tmp_path):
    guest, host = workdir(root, "mkimage-bad")
    proc = helper_run(root, "--disk", "disk.img.part,size=64M,name=out",
                      "recipes/mkimage.sh", "--esp-size", "20MiB", "no-such-root.tar",
                      "disk.img", cwd=guest)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip().splitlines()
    assert "no-such-root.tar does not exist" in err[0]
    assert leftovers(host) == []  # neither disk.img nor disk.img.part
    # The default 256 MiB ESP leaves a 64 MiB disk no root: refused before the disk.
    proc = helper_run(root, "--disk", "disk.img.part,size=64M,name=out",
                      "recipes/mkimage.sh", "no-such-root.tar", "disk.img", cwd=guest)
    assert proc.returncode == 2
    assert "leaves no room for the root (at least 8 MiB) after the 256MiB ESP" in \
        proc.stderr.decode().splitlines()[0]
    assert leftovers(host) == []


@pytest.mark.slow
@pytest.mark.vm
def test_failure_after_partitioning_removes_the_part_file(root):
    """A tarball that is not a root filesystem fails after the disk was partitioned,
    formatted and filled: the recipe unmounts, removes disk.img.part and says so."""
    guest, host = workdir(root, "mkimage-notroot")
    (host / "tree").mkdir()
    (host / "tree/hello").write_text("hi\n")
    subprocess.run(["tar", "-C", str(host / "tree"), "-cf", str(host / "notroot.tar"), "."],
                   check=True)
    shutil.rmtree(host / "tree")
    (host / "notes.txt").write_text("not a tarball\n")
    subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(host)],
                   check=True)
    proc = helper_run(root, "--disk", "disk.img.part,size=64M,name=out",
                      "recipes/mkimage.sh", "--esp-size", "40MiB", "notroot.tar", "disk.img",
                      cwd=guest)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "has no /etc: not a root filesystem" in err and "no image was written" in err
    assert leftovers(host) == ["notes.txt", "notroot.tar"]
    proc = helper_run(root, "--disk", "disk.img.part,size=64M,name=out",
                      "recipes/mkimage.sh", "--esp-size", "20MiB", "notes.txt", "disk.img",
                      cwd=guest)
    assert proc.returncode == 1
    assert "neither a directory nor a tar archive" in proc.stderr.decode().splitlines()[0]
    assert leftovers(host) == ["notes.txt", "notroot.tar"]
    # xfsprogs is not installed in this build root: said in one line, before any work.
    proc = helper_run(root, "--disk", "disk.img.part,size=64M,name=out",
                      "recipes/mkimage.sh", "--esp-size", "20MiB", "--fs", "xfs", "notroot.tar",
                      "disk.img", cwd=guest)
    assert proc.returncode == 1
    assert "mkfs.xfs is not in the helper image (install xfsprogs" in \
        proc.stderr.decode().splitlines()[0]
    assert leftovers(host) == ["notes.txt", "notroot.tar"]


# A valid value for every option mkimage.sh --help documents (None: a flag).
OPTION_VALUES = {
    "--device": "/dev/no-such-disk", "--table": "gpt", "--esp-size": "100MiB",
    "--fs": "ext4", "--label": "root", "--root-uuid": "5b5c0d3e-0000-4000-8000-000000000001",
    "--root-partuuid": "5b5c0d3e-0000-4000-8000-000000000002", "--bootloader": "none",
    "--kernel": "6.1.0", "--append": "quiet", "--console": "", "--qcow2": "x.qcow2",
    "--sha256": None, "--size": "1G", "--prefilled": None, "--esp-id": "0badcafe",
    "--seed": "release-1", "--root-sha256": "ab" * 32, "--arch": "aarch64", "--help": None,
}
# A shell that is not installed shows as a skip (-rs), not as a parameter gone missing.
SHELLS = [pytest.param(shell, id=" ".join(shell),
                       marks=pytest.mark.skipif(shutil.which(shell[0]) is None,
                                                reason=f"{shell[0]} is not installed"))
          for shell in (["sh"], ["dash"], ["busybox", "sh"], ["bash", "--posix"])]


def recipe(shell: list[str], *argv: str, env: dict | None = None):
    return subprocess.run([*shell, str(chroot.SRC / "recipes/mkimage.sh"), *argv],
                          capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **(env or {})})


@pytest.mark.parametrize("shell", SHELLS)
def test_every_documented_option_is_parsed_and_others_are_refused(shell):
    """mkimage.sh under each POSIX shell here: each option --help lists is taken (the
    run goes on to look for its disk), an unknown one and bad values are usage errors
    (exit 2) before any disk is looked at; --help says how to get reproducible images."""
    help_text = recipe(shell, "--help").stdout
    options = help_text.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^  (--[a-z0-9-]+|-h, --help)", options, re.M))
    documented = {"--help" if o == "-h, --help" else o for o in documented}
    assert documented == set(OPTION_VALUES)
    assert "SOURCE_DATE_EPOCH" in help_text and "--seed" in help_text
    for option, value in OPTION_VALUES.items():
        if option in ("--help", "--device"):
            continue
        argv = [option] if value is None else [option, value]
        proc = recipe(shell, *argv, "root.tar", "out.img")
        assert proc.returncode == 2 and "no disk to build on" in proc.stderr, (option, proc)
    proc = recipe(shell, "--device", "/dev/no-such-disk", "root.tar")
    assert proc.returncode == 1 and "/dev/no-such-disk does not exist" in proc.stderr
    for argv, env, words in (
            (["--frobnicate"], {}, "unknown option --frobnicate"),
            (["--fs", "ext5"], {}, "--fs must be ext4, xfs or btrfs"),
            (["--esp-size", "lots"], {}, "--esp-size: a size like"),
            (["--table", "mbr", "--root-partuuid", "x-01"], {}, "DISKID-01"),
            (["--seed", "two\nlines"], {}, "--seed: one line"),
            ([], {"SOURCE_DATE_EPOCH": "yesterday"}, "SOURCE_DATE_EPOCH must be seconds"),
            (["--fs", "xfs"], {"SOURCE_DATE_EPOCH": "1"}, "reproducible images"),
            (["--root-sha256", "abc"], {}, "--root-sha256: 64 hex digits")):
        proc = recipe(shell, *argv, "root.tar", "out.img", env=env)
        assert proc.returncode == 2, (argv, proc)
        assert words in proc.stderr.splitlines()[0], (argv, proc.stderr)


@pytest.mark.slow
@pytest.mark.vm
def test_mbr_extlinux_image_boots_with_bios(root, target_tar, tmp_path):
    image = build_image(root, target_tar, "mkimage-mbr", "mkimage-mbr.sh")
    lay = imagecheck.layout(image)
    assert lay.label == "dos" and len(lay.partitions) == 1
    (rootp,) = lay.partitions
    assert rootp.type == "83" and rootp.bootable
    root_img = imagecheck.extract(image, rootp, tmp_path / "root.img")
    fsck = imagecheck.fsck(root_img, "ext4")
    assert fsck.returncode == 0, fsck.stdout
    root_fs = imagecheck.probe(root_img)
    assert f"UUID={root_fs['UUID']} / ext4 " in imagecheck.ext_cat(root_img, "/etc/fstab")
    partuuid = f"{lay.label_id.removeprefix('0x')}-01"
    conf = imagecheck.ext_cat(root_img, "/boot/extlinux/extlinux.conf")
    assert f"root=PARTUUID={partuuid}" in conf
    assert imagecheck.ext_exists(root_img, "/boot/extlinux/ldlinux.sys")
    # syslinux's MBR code in the first sector (a blank MBR has zeros there).
    assert image.read_bytes()[:440].strip(b"\0")
    check_boot(image, "bios", tmp_path / "console.log", partuuid)


@pytest.mark.slow
@pytest.mark.vm
def test_loop_recipe_grub_image_boots_with_uefi(root, target_tar, tmp_path):
    """The loop-device style (truncate + losetup -fP on a file in the share), with
    GRUB's EFI image at the removable path instead of systemd-boot."""
    guest, host = workdir(root, "mkimage-loop")
    proc = helper_run(root, "--disk", f"{target_tar},ro,name=src",
                      "recipes/mkimage-loop.sh", "--size", "1G", "--bootloader", "grub",
                      "--append", MARKER_APPEND, "/dev/disk/hshelper/src", "disk.img",
                      cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"/dev/loop" in proc.stderr
    assert leftovers(host) == ["disk.img"]
    image = host / "disk.img"
    found = check_esp_and_root(image, tmp_path)
    rootp = found["layout"].partitions[1]
    grub_cfg = imagecheck.fat_cat(found["esp"], "/EFI/BOOT/grub.cfg")
    assert f"--set=root {found['root_fs']['UUID']}" in grub_cfg
    assert f"root=PARTUUID={rootp.uuid.lower()}" in grub_cfg
    lines = check_boot(image, "uefi", tmp_path / "console.log", rootp.uuid.lower())
    assert any(line.endswith("esp BOOTX64.EFI") for line in lines), lines


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_xfs_and_btrfs_roots_boot(root_factory, fstype, tmp_path):
    """--fs xfs|btrfs in a build root that has xfsprogs and btrfs-progs: the helper
    image gets their mkfs and modules; the image is checked and boots with UEFI."""
    fsroot = root_factory("bookworm-xfs-btrfs")
    tar = put_target_tar(fsroot)
    with chroot.proc_mounted(fsroot):
        image = build_image(fsroot, tar, f"mkimage-{fstype}", "mkimage.sh", "--fs", fstype)
    lay = imagecheck.layout(image)
    esp, rootp = lay.partitions
    assert rootp.type == ROOT_X86_64_TYPE
    esp_img = imagecheck.extract(image, esp, tmp_path / "esp.img")
    root_img = imagecheck.extract(image, rootp, tmp_path / "root.img")
    assert imagecheck.fsck(esp_img, "vfat").returncode == 0
    fsck = imagecheck.fsck(root_img, fstype)
    assert fsck.returncode == 0, (fsck.stdout, fsck.stderr)
    assert imagecheck.probe(root_img)["TYPE"] == fstype
    entry = imagecheck.fat_cat(esp_img, "/loader/entries/linux.conf")
    assert f"rootfstype={fstype}" in entry
    lines = check_boot(image, "uefi", tmp_path / "console.log", rootp.uuid.lower())
    assert any(line.endswith(f" {fstype}") and " root /dev/vda2" in line for line in lines)
    assert any(line.endswith("esp BOOTX64.EFI") for line in lines), lines  # fstab's UUID


@pytest.mark.slow
def test_hshelper_recipes_lists_the_installed_recipes(root):
    proc = chroot.run(root, ["hshelper", "recipes"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    for name in ("mkimage", "mkimage-mbr", "mkimage-loop"):
        path = f"/opt/hshelper/hshelper/recipes/{name}.sh"
        assert path in out
        assert (root / path.lstrip("/")).is_file()


@pytest.mark.slow
@pytest.mark.vm
def test_recipe_by_name_help_and_unknown_name(root):
    guest = chroot.fresh_dir(root, "recipe-help")
    proc = helper_run(root, "--recipe", "mkimage-loop", "--help", cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"usage: mkimage-loop.sh" in proc.stdout and b"--size" in proc.stdout
    bad = helper_run(root, "--recipe", "no-such-recipe", "x", cwd=guest)
    assert bad.returncode == 2
    assert bad.stderr.decode().count("\n") == 1 and b"mkimage" in bad.stderr


@pytest.mark.slow
@pytest.mark.vm
def test_recipe_by_name_from_a_directory_with_qcow2_and_sha256(root, tmp_path):
    """--recipe delivers the installed recipe; ROOT a directory over the 9p share;
    --qcow2 (qemu-img added with --with) and --sha256 written only at the end."""
    guest = chroot.fresh_dir(root, "recipe-dir")
    host = root / guest.lstrip("/")
    tree = host / "tree"
    for rel, text in (("etc/hostname", "tiny\n"), ("usr/share/hello/README", "hi\n")):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(tree)],
                   check=True)
    proc = helper_run(root, "--with", "qemu-img",
                      "--disk", "small.img.part,size=128M,name=out",
                      "--recipe", "mkimage", "--esp-size", "40MiB", "--bootloader", "none",
                      "--qcow2", "small.qcow2", "--sha256", "tree", "small.img", cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    names = sorted(p.name for p in host.iterdir() if p.name != "tree")
    assert names == ["small.img", "small.img.sha256", "small.qcow2", "small.qcow2.sha256"]
    for name in ("small.img", "small.qcow2"):
        check = subprocess.run(["sha256sum", "-c", f"{name}.sha256"], cwd=host,
                               capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout == f"{name}: OK\n"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(host / "small.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "qcow2"' in info
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                           str(host / "small.img"), str(host / "small.qcow2")])
    assert same.returncode == 0
    found = check_layout_only(host / "small.img", tmp_path)
    assert imagecheck.ext_cat(found, "/usr/share/hello/README") == "hi\n"
    assert "/boot/efi vfat" in imagecheck.ext_cat(found, "/etc/fstab")


def check_layout_only(image: Path, tmp: Path) -> Path:
    lay = imagecheck.layout(image)
    assert lay.label == "gpt" and [p.name for p in lay.partitions] == ["esp", "root"]
    esp = imagecheck.extract(image, lay.partitions[0], tmp / "esp.img")
    root_img = imagecheck.extract(image, lay.partitions[1], tmp / "root.img")
    assert imagecheck.fsck(esp, "vfat").returncode == 0
    assert imagecheck.fsck(root_img, "ext4").returncode == 0
    return root_img


@pytest.mark.parametrize("name", ["mkimage-mbr", "mkimage-loop"])
def test_front_recipes_have_help(name):
    proc = subprocess.run(["sh", str(chroot.SRC / f"recipes/{name}.sh"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {name}.sh")
    assert "SOURCE_DATE_EPOCH" in proc.stdout and "--seed" in proc.stdout


def test_recipe_files_travel_intact_in_the_setup_code(tmp_path):
    """The here-documents of the plugin's guest step reproduce every file exactly."""
    scripts = recipe_files.scripts()
    assert {"mkimage.sh", "mkimage-mbr.sh", "mkimage-loop.sh"} <= set(scripts)
    code = plugin.install_code(scripts, quote(str(tmp_path / "r")))
    subprocess.run(["sh", "-e", "-c", code], check=True)
    for name, text in scripts.items():
        copy = tmp_path / "r" / name
        assert copy.read_text() == text and os.access(copy, os.X_OK)


def test_recipe_names_only(tmp_path):
    assert plugin.resolve("mkimage") == "/hshelper/recipes/mkimage.sh"
    for bad in ("no-such", "../mkimage", "/bin/sh"):
        with pytest.raises(HshelperError) as err:
            plugin.resolve(bad)
        assert err.value.status == 2
    with pytest.raises(HshelperError):
        plugin.install_code({"x.sh": f"echo\n{plugin.EOF_WORD}\nrm -rf /\n"})


# ------------------------------------------------------------------ the host fill


@pytest.mark.slow
@pytest.mark.vm
def test_recipe_by_name_fills_the_root_on_the_host_and_boots(root, target_tar, tmp_path):
    """--recipe mkimage --size: OUTPUT.part attached by hshelper, the root written on
    the host while the VM boots, entry for entry what root's GNU tar makes of the same
    tarball; the image boots with UEFI."""
    guest, host = workdir(root, "mkimage-hostfill")
    proc = helper_run(root, "-v", "--recipe", "mkimage", "--size", "1G", "--append",
                      MARKER_APPEND, target_tar, "disk.img", cwd=guest)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "hshelper: mkimage: root filled on the host in" in err
    assert "using the partition table and root filesystem made on the host" in err
    assert leftovers(host) == ["disk.img"]  # no OUTPUT.part, no markers
    image = host / "disk.img"
    assert image.stat().st_uid == chroot.BUILD_UID and image.stat().st_size == 2**30
    found = check_esp_and_root(image, tmp_path)
    tar_path = root / target_tar.lstrip("/")
    ref = tmp_path / "ref.img"
    subprocess.run(["truncate", "-s", "2G", str(ref)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(ref)], check=True)
    with imagecheck.loop_mounted(ref, tmp_path / "ref", readonly=False) as mnt:
        subprocess.run(["tar", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "-xf", str(tar_path), "-C", str(mnt)], check=True)
    with imagecheck.loop_mounted(found["root"], tmp_path / "a") as a, \
            imagecheck.loop_mounted(ref, tmp_path / "b") as b:
        # The recipe's own changes (fstab, the ESP's mount point) and mkfs's lost+found.
        skip = ("lost+found",)
        ours = imagecheck.tree_listing(a, skip)
        theirs = imagecheck.tree_listing(b, skip)
        for listing in (ours, theirs):
            listing.pop("etc/fstab", None)
            listing.pop("boot/efi", None)
            listing.pop("boot", None)  # its mtime: the recipe made boot/efi in it
            listing.pop("etc", None)  # and wrote fstab
            # The marker is appended to the tarball after its directory's members: GNU
            # tar stamps such a directory with the time of extraction, the host fill
            # keeps the tarball's time. Everything else of it must match.
            sbin = listing["usr/local/sbin"]
            listing["usr/local/sbin"] = sbin[:4] + sbin[5:]
        assert len(ours) > 5000
        assert ours == theirs
    rootp = found["layout"].partitions[1]
    check_boot(image, "uefi", tmp_path / "console.log", rootp.uuid.lower())


@pytest.mark.slow
@pytest.mark.vm
def test_host_fill_falls_back_to_the_guest_for_acls(root, tmp_path):
    """A tarball with POSIX ACLs: one line says why, GNU tar in the guest does it."""
    import test_hostfill
    guest, host = workdir(root, "mkimage-acl")
    test_hostfill.crafted_tarball(host / "root.tar", acl=True)
    proc = helper_run(root, "--recipe", "mkimage", "--size", "128M", "--esp-size",
                      "40MiB", "--bootloader", "none", "root.tar", "small.img", cwd=guest)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "hshelper: mkimage: filling the root in the VM: acl: POSIX ACLs" in err
    assert "filling the ext4 root from /dev/disk/hshelper/src (tar)" in err
    assert leftovers(host) == ["root.tar", "small.img"]
    root_img = imagecheck.extract(host / "small.img",
                                  imagecheck.layout(host / "small.img").partitions[1],
                                  tmp_path / "root.img")
    assert imagecheck.fsck(root_img, "ext4").returncode == 0
    with imagecheck.loop_mounted(root_img, tmp_path / "m") as mnt:
        assert b"user:1000:r--" in subprocess.run(
            ["getfacl", "-n", str(mnt / "acl")], capture_output=True).stdout
        assert os.stat(mnt / "usr/bin/su").st_mode == 0o104755


def tree_tarball(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    """A small root tree as a tarball (``mode``: tarfile's, "w:xz" for xz), owned by
    root in the archive and by the build user on disk."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
            tf.addfile(info, io.BytesIO(data))
    os.chown(path, chroot.BUILD_UID, chroot.BUILD_UID)
    return path


SMALL = {"etc/hostname": b"small\n", "etc/fstab": b"# none\n",
         "usr/share/note": b"x" * 5000 + b"\n"}
SMALL_JOB = ["--recipe", "mkimage", "--size", "128M", "--esp-size", "40MiB",
             "--bootloader", "none"]


def root_of(image: Path, tmp: Path) -> Path:
    """The root partition of a GPT image, fsck-checked."""
    root_img = imagecheck.extract(image, imagecheck.layout(image).partitions[-1],
                                  tmp / "root.img")
    proc = imagecheck.fsck(root_img, "ext4")
    assert proc.returncode == 0, proc.stdout
    return root_img


@pytest.mark.slow
@pytest.mark.vm
def test_host_fill_failures_leave_nothing(root):
    """A tarball cut short fails before the VM starts (exit 1); sizes that cannot fit
    are refused before any work (exit 2, one line); a fill that fails while the VM
    boots (mke2fs runs out of inodes) stops the VM and its error is what the user
    reads (exit 1). None leaves an image, part file, marker or unpacked tree."""
    guest, host = workdir(root, "mkimage-fail")
    tree = host / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("big\n")
    (tree / "big.bin").write_bytes(os.urandom(48 << 20))
    subprocess.run(["tar", "-C", str(tree), "-cf", str(host / "big.tar"), "."], check=True)
    shutil.rmtree(tree)
    data = (host / "big.tar").read_bytes()
    (host / "cut.tar").write_bytes(data[:len(data) // 2])
    tree_tarball(host / "many.tar", {**{f"d/{i:05}": b"" for i in range(12000)},
                                     "etc/hostname": b"many\n"})
    subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(host)],
                   check=True)
    inputs = ["big.tar", "cut.tar", "many.tar"]
    common = ["--recipe", "mkimage", "--size", "64M", "--esp-size", "20MiB",
              "--bootloader", "none"]
    proc = helper_run(root, *common, "cut.tar", "disk.img", cwd=guest)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "cannot read" in err and "cut.tar" in err
    assert leftovers(host) == inputs
    # Issue 13: the default 256 MiB ESP leaves nothing of 256M (mke2fs used to fail
    # while qemu could not open the removed part file).
    proc = helper_run(root, "--recipe", "mkimage", "--size", "256M", "--bootloader", "none",
                      "big.tar", "disk.img", cwd=guest)
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1
    assert "leaves no room for the root (at least 8 MiB) after the 256MiB ESP" in \
        proc.stderr.decode()
    proc = helper_run(root, *common, "big.tar", "disk.img", cwd=guest)
    assert proc.returncode == 2 and proc.stderr.decode().count("\n") == 1
    assert "the root tree (48 MiB in 4 entries) needs at least 55 MiB of ext4, more than " \
        "the 42 MiB root partition: a larger --size" in proc.stderr.decode()
    assert leftovers(host) == inputs
    with chroot.shm_mounted(root) as shm:  # the unpack goes there, as with mock/sbuild
        proc = helper_run(root, *common, "many.tar", "disk.img", cwd=guest)
        assert os.listdir(shm) == []
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1, lines
    assert lines[-1].startswith("hshelper: mkimage: filling the root on the host failed: "
                                "making the root filesystem failed: mke2fs: "), lines
    assert not any("qemu" in line or "guest setup failed" in line for line in lines), lines
    assert leftovers(host) == inputs


@pytest.mark.slow
@pytest.mark.vm
def test_wrong_values_are_refused_before_any_work(root):
    guest, host = workdir(root, "mkimage-values")
    tree_tarball(host / "root.tar", SMALL)
    for argv, words in ((["--fs", "ext5"], "--fs must be ext4, xfs or btrfs, not 'ext5'"),
                        (["--bootloader", "lilo"], "--bootloader must be"),
                        (["--esp-size", "lots"], "--esp-size: a size like")):
        proc = helper_run(root, "--recipe", "mkimage", "--size", "64M", *argv, "root.tar",
                          "disk.img", cwd=guest)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.count("\n") == 1, err
        assert err.startswith(f"hshelper: mkimage: {words}"), err
        assert leftovers(host) == ["root.tar"]
    # The same through the recipe by path: it refuses in the VM, before the disk.
    proc = helper_run(root, "--disk", "disk.img.part,size=64M,name=out",
                      "recipes/mkimage.sh", "--fs", "ext5", "root.tar", "disk.img", cwd=guest)
    assert proc.returncode == 2
    assert "--fs must be ext4, xfs or btrfs" in proc.stderr.decode().splitlines()[0]
    assert leftovers(host) == ["root.tar"]


@pytest.mark.slow
@pytest.mark.vm
def test_mbr_host_fill_with_given_ids_boots_with_bios(root, slim_tar, tmp_path):
    """--recipe mkimage-mbr: the MBR table, the ext4 root without 64bit and the given
    --root-uuid/--root-partuuid written on the host; extlinux by the guest; SeaBIOS."""
    guest, host = workdir(root, "mkimage-mbr-host")
    root_uuid = "5b5c0d3e-1111-4222-8333-444455556666"
    proc = helper_run(root, "-v", "--recipe", "mkimage-mbr", "--size", "1G", "--root-uuid",
                      root_uuid, "--root-partuuid", "0badcafe-01", "--append", MARKER_APPEND,
                      slim_tar, "disk.img", cwd=guest)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "hshelper: mkimage: root filled on the host in" in err
    assert leftovers(host) == ["disk.img"]
    image = host / "disk.img"
    lay = imagecheck.layout(image)
    assert (lay.label, lay.label_id) == ("dos", "0x0badcafe")
    [rootp] = lay.partitions
    assert rootp.type == "83" and rootp.bootable
    root_img = imagecheck.extract(image, rootp, tmp_path / "root.img")
    assert imagecheck.fsck(root_img, "ext4").returncode == 0
    assert imagecheck.probe(root_img)["UUID"] == root_uuid
    features = imagecheck.run(["dumpe2fs", "-h", str(root_img)]).stdout
    assert "64bit" not in features and "has_journal" in features
    assert f"UUID={root_uuid} / ext4 " in imagecheck.ext_cat(root_img, "/etc/fstab")
    conf = imagecheck.ext_cat(root_img, "/boot/extlinux/extlinux.conf")
    assert "root=PARTUUID=0badcafe-01" in conf
    assert imagecheck.ext_exists(root_img, "/boot/extlinux/ldlinux.sys")
    assert image.read_bytes()[:440].strip(b"\0")  # syslinux's MBR code
    check_boot(image, "bios", tmp_path / "console.log", "0badcafe-01")


@pytest.mark.slow
@pytest.mark.vm
def test_guest_fill_by_option_and_by_config_with_given_ids(root, tmp_path):
    """--guest-fill, and [mkimage] host_fill = false in ./hshelper.toml: the guest
    fills the root (its step says so; the host's line does not appear), and the
    given --root-uuid, --root-partuuid and --esp-id are on the image."""
    ids = {"--root-uuid": "5b5c0d3e-1111-4222-8333-444455556666",
           "--root-partuuid": "5b5c0d3e-7777-4888-9999-aaaabbbbcccc",
           "--esp-id": "0badcafe"}
    given = [word for pair in ids.items() for word in pair]
    for how in ("option", "config"):
        guest, host = workdir(root, f"mkimage-guest-{how}")
        tree_tarball(host / "root.tar", SMALL)
        extra = ["--guest-fill"] if how == "option" else []
        if how == "config":
            (host / "hshelper.toml").write_text("[mkimage]\nhost_fill = false\n")
        proc = helper_run(root, "-v", *extra, *SMALL_JOB, *given, "root.tar", "small.img",
                          cwd=guest)
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        assert "filling the ext4 root from /dev/disk/hshelper/src (tar)" in err
        assert "root filled on the host" not in err
        image = host / "small.img"
        lay = imagecheck.layout(image)
        assert lay.partitions[1].uuid.lower() == ids["--root-partuuid"]
        esp = imagecheck.extract(image, lay.partitions[0], tmp_path / "esp.img")
        assert imagecheck.probe(esp)["UUID"] == "0BAD-CAFE"
        root_img = root_of(image, tmp_path)
        assert imagecheck.probe(root_img)["UUID"] == ids["--root-uuid"]
        assert imagecheck.ext_cat(root_img, "/etc/hostname") == "small\n"
        assert "UUID=0BAD-CAFE /boot/efi vfat" in imagecheck.ext_cat(root_img, "/etc/fstab")


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.parametrize("kind", ["xz", "zstd", "bzip2"])
def test_compressed_tarballs(root, tmp_path, kind):
    """The host fill reads xz, zstd and bzip2 tarballs itself; the guest decompresses
    with the build root's program (brought in by --with), or says in one line that it
    is missing."""
    guest, host = workdir(root, f"mkimage-{kind}")
    name = f"root.tar.{ {'xz': 'xz', 'zstd': 'zst', 'bzip2': 'bz2'}[kind]}"
    if kind == "zstd":
        tree_tarball(host / "root.tar", SMALL)
        subprocess.run(["zstd", "-q", "--rm", str(host / "root.tar"), "-o", str(host / name)],
                       check=True)
        os.chown(host / name, chroot.BUILD_UID, chroot.BUILD_UID)
    else:
        tree_tarball(host / name, SMALL, {"xz": "w:xz", "bzip2": "w:bz2"}[kind])
    proc = helper_run(root, "-v", *SMALL_JOB, name, "host.img", cwd=guest)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "root filled on the host" in err
    root_img = root_of(host / "host.img", tmp_path)
    assert imagecheck.ext_cat(root_img, "/usr/share/note") == "x" * 5000 + "\n"
    assert "User:     0   Group:     0" in imagecheck.run(
        ["debugfs", "-R", "stat /etc/hostname", str(root_img)]).stdout
    installed = (root / "usr/bin" / kind).exists()
    proc = helper_run(root, "--guest-fill", *(["--with", kind] if installed else []),
                      *SMALL_JOB, name, "guest.img", cwd=guest)
    err = proc.stderr.decode()
    if installed:
        assert proc.returncode == 0, err
        assert f"({kind})" in err
        guest_root = root_of(host / "guest.img", tmp_path)
        assert imagecheck.ext_cat(guest_root, "/usr/share/note") == "x" * 5000 + "\n"
        assert leftovers(host) == sorted(["guest.img", "host.img", name])
    else:
        assert proc.returncode == 1, err
        assert err.splitlines()[0] == (f"mkimage.sh: {kind} is not in the helper image: "
                                       f"decompress ROOT first, or helper-run --with {kind}")
        assert leftovers(host) == sorted(["host.img", name])


def _child_qemus(pid: int) -> set[int]:
    """The qemu started by helper-run ``pid`` (other runs may share the machine)."""
    from test_commands import _parent
    return {q for q in qemu_pids_all() if _parent(q) == pid}


def qemu_pids_all() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/exe").endswith("qemu-system-x86_64"):
                    pids.add(int(entry))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.parametrize("signum, when", [(signal.SIGINT, "recipe"),
                                          (signal.SIGTERM, "boot")])
def test_interrupted_recipe_leaves_no_part_file_and_no_qemu(root, signum, when):
    """SIGINT while the recipe unpacks in the guest, SIGTERM while the VM boots and
    the host fills the root: 128+signal, no qemu, no OUTPUT.part, markers or tree."""
    guest, host = workdir(root, f"mkimage-signal-{when}")
    tree_tarball(host / "root.tar", {**SMALL, "big.bin": os.urandom(40 << 20)})
    argv = ["chroot", f"--userspec={chroot.BUILD_UID}:{chroot.BUILD_UID}", str(root),
            "/usr/bin/env", "-i", f"HOME={chroot.HOME}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "/bin/sh", "-c", 'cd "$0" && exec "$@"', guest, "helper-run",
            *(["--guest-fill"] if when == "recipe" else []), *SMALL_JOB, "root.tar",
            "small.img"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if when == "recipe":
            seen = b""
            while b"filling the ext4 root from" not in seen:
                line = proc.stderr.readline()
                assert line, seen.decode()
                seen += line
        else:
            deadline = time.monotonic() + 60
            while not (list(host.glob(".hshelper-fill-*")) and _child_qemus(proc.pid)) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list(host.glob("small.img.part")), "the host fill should have begun"
        qemus = _child_qemus(proc.pid)
        assert qemus, "qemu should be running now"
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=60) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    deadline = time.monotonic() + 10
    while qemus & qemu_pids_all() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemus & qemu_pids_all()
    assert leftovers(host) == ["root.tar"]


@pytest.mark.slow
@pytest.mark.vm
def test_compressed_tarball_attached_as_a_disk(root, tmp_path):
    """A gzip tarball as a read-only disk: padded to whole sectors in the guest, read
    for its own size only (HSHELPER_DISK_SRC_BYTES)."""
    guest, host = workdir(root, "mkimage-gz-disk")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("gz\n")
    (tree / "usr/share").mkdir(parents=True)
    (tree / "usr/share/note").write_text("x" * 1000 + "\n")
    subprocess.run(["tar", "--owner=0", "--group=0", "-C", str(tree), "-czf",
                    str(host / "root.tar.gz"), "."], check=True)
    assert (host / "root.tar.gz").stat().st_size % 512  # really padded as a disk
    subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(host)],
                   check=True)
    proc = helper_run(root, "--disk", "root.tar.gz,ro,name=src",
                      "--disk", "small.img.part,size=128M,name=out",
                      "recipes/mkimage.sh", "--esp-size", "40MiB", "--bootloader", "none",
                      "/dev/disk/hshelper/src", "small.img", cwd=guest)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "(gzip)" in proc.stderr.decode()
    found = check_layout_only(host / "small.img", tmp_path)
    assert imagecheck.ext_cat(found, "/etc/hostname") == "gz\n"
    assert imagecheck.ext_cat(found, "/usr/share/note") == "x" * 1000 + "\n"

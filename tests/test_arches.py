"""Helper VMs of other architectures, for real: Debian build roots for arm64, ppc64el,
s390x, i386, armhf (bookworm) and riscv64 (trixie), made on this x86_64 machine;
hshelper runs on the host as the unprivileged build user with --sysroot ROOT and boots
the root's own kernel under the host's qemu-system-ARCH (TCG); and for arm64, inside
the root itself through qemu-user, with the root's own qemu."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import buildroots
import chroot
import imagecheck
import pytest

from hshelper.qemu import machines

pytestmark = [pytest.mark.slow, pytest.mark.vm]

ARCHES = {"arm64": "aarch64", "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
          "i386": "i686", "armhf": "armv7l"}
QEMU = {"arm64": "qemu-system-aarch64", "ppc64el": "qemu-system-ppc64",
        "s390x": "qemu-system-s390x", "riscv64": "qemu-system-riscv64",
        "i386": "qemu-system-x86_64", "armhf": "qemu-system-arm"}


# Beside the test roots, not in pytest's temporary directory (root's, and closed).
HOST = buildroots.CACHE / "host"


@pytest.fixture(scope="module")
def staged():
    HOST.mkdir(parents=True, exist_ok=True)
    HOST.chmod(0o755)
    return chroot.host_install(HOST)


@pytest.fixture
def home(request):
    """A fresh working directory and home for the build user on the host."""
    home = HOST / "home" / request.node.name.replace("[", "-").replace("]", "")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    home.parent.chmod(0o755)
    os.chown(home, chroot.BUILD_UID, chroot.BUILD_UID)
    return home


def foreign_root(name: str) -> Path:
    if shutil.which(QEMU[name]) is None:
        pytest.skip(f"{QEMU[name]} is not installed")
    return buildroots.ensure_root(name)


@pytest.mark.parametrize("name", list(ARCHES))
def test_build_and_a_disk_job_in_the_roots_architecture(name, staged, home):
    root = foreign_root(name)
    build = chroot.run_host(staged, "hshelper", ["build", "--json", "--sysroot", str(root)],
                            home, home)
    assert build.returncode == 0, build.stderr.decode()
    info = chroot.run_host(staged, "hshelper", ["info", "--sysroot", str(root)], home, home)
    assert info.returncode == 0, info.stderr.decode()
    assert f"guest architecture: {ARCHES[name]}" in info.stdout.decode()
    restores = machines.lookup(ARCHES[name]).restores
    states = ("off" if expected_start("on") == "booted" else
              "on:" if restores else "never")
    assert f"saved VM states: {states}" in info.stdout.decode()
    # The first run boots and saves the VM state; the disk job and the run after it are
    # restored from it (machines without vmgenid reseed the guest's RNG themselves).
    # Machines whose restores do not run right (Machine.restore_fault) boot every run.
    uuids = [random_uuid(staged, root, home, "saved" if restores else "booted")]
    script = ("uname -m; printf 'label: gpt\\n,,L\\n' | sfdisk -q $HSHELPER_DISK_OUT && "
              "mkfs.ext4 -q -L arch ${HSHELPER_DISK_OUT}1 && mkdir -p /mnt/t && "
              "mount ${HSHELPER_DISK_OUT}1 /mnt/t && uname -m > /mnt/t/written-by && "
              "cat /mnt/t/written-by && umount /mnt/t")
    run = chroot.run_host(staged, "helper-run",
                          ["--sysroot", str(root), "--disk", "out.img,size=64M,name=out",
                           "--report", "disk.json", "sh", "-c", script], home, home)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().split() == [ARCHES[name], ARCHES[name]]
    assert started(home / "disk.json") == expected_start("restored" if restores else "booted")
    uuids.append(random_uuid(staged, root, home, "restored" if restores else "booted"))
    assert uuids[0] != uuids[1], "two runs from one saved state drew the same random UUID"
    image = home / "out.img"
    assert image.stat().st_uid == chroot.BUILD_UID
    dump = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                          check=True).stdout
    assert '"label":"gpt"' in dump.replace(" ", "")
    start = int(dump.split('"start":')[1].split(",")[0])
    part = home / "p1.img"
    subprocess.run(["dd", f"if={image}", f"of={part}", "bs=512", f"skip={start}",
                    "status=none"], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /written-by", str(part)],
                         capture_output=True, text=True)
    assert cat.stdout == f"{ARCHES[name]}\n"


def started(report: Path) -> str:
    return json.loads(report.read_text())["timings"]["start"]


def expected_start(restored: str) -> str:
    """How a run starts: as given, or "booted" with saved states switched off."""
    return "booted" if os.environ.get("HSHELPER_RUN_SAVED_STATES") == "0" else restored


def random_uuid(staged: Path, root: Path, home: Path, start: str) -> str:
    run = chroot.run_host(staged, "helper-run",
                          ["--sysroot", str(root), "--report", "uuid.json", "--timeout", "60",
                           # sleep: a restored guest's timers must fire (they did not
                           # on ppc64le and riscv64 under QEMU 7.2)
                           "sh", "-c", "sleep 0.5; cat /proc/sys/kernel/random/uuid"],
                          home, home)
    assert run.returncode == 0, run.stderr.decode()
    assert started(home / "uuid.json") == expected_start(start)
    return run.stdout.decode().strip()


def test_inside_the_arm64_root_through_qemu_user(home):
    """The build root's own python3 and qemu-system-aarch64 (arm64 binaries) run through
    qemu-user; the guest boots under that qemu's TCG: slow (minutes), but it is what an
    emulated arm64 build does."""
    root = foreign_root("arm64")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("binfmt_misc has no qemu-aarch64 (scripts/setup registers it)")
    chroot.install(root)
    work = chroot.fresh_dir(root, "inside")
    with chroot.proc_mounted(root):
        proc = chroot.run(root, ["helper-run", "-q", "sh", "-c", "uname -m > arch.txt"],
                          cwd=work, timeout=1200)
    assert proc.returncode == 0, proc.stderr.decode()
    out = root / work.lstrip("/") / "arch.txt"
    assert out.read_text() == "aarch64\n" and out.stat().st_uid == chroot.BUILD_UID


def arm64_image(staged: Path, home: Path, recipe: str) -> Path:
    """``helper-run --recipe RECIPE`` in the arm64 build root (from the host, as the
    build user): a 1 GiB image of the arm64 target system whose kernel runs the marker
    as init. The initramfs has the modules the marker boot needs; the root does without
    them."""
    root = foreign_root("arm64")
    target = buildroots.ensure_root("target-arm64")
    tarball = imagecheck.target_tarball(target, home / "root.tar",
                                        exclude=("./lib/modules", "./usr/share"))
    os.chown(tarball, chroot.BUILD_UID, chroot.BUILD_UID)
    proc = chroot.run_host(staged, "helper-run",
                           ["--sysroot", str(root), "--recipe", recipe, "--size", "1G",
                            "--append", "init=/usr/local/sbin/marker", "root.tar",
                            "disk.img"], home, home, timeout=1200)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return home / "disk.img"


def test_an_aarch64_image_by_the_recipe_boots_with_uefi(staged, home):
    """recipes/mkimage.sh for aarch64: GPT with the aarch64 root type, systemd-boot at
    EFI/BOOT/BOOTAA64.EFI, the kernel and initramfs of an arm64 system; booted under
    qemu-system-aarch64 with UEFI firmware (qemu-efi-aarch64) to its marker."""
    if not imagecheck.AAVMF_CODE.exists():
        pytest.skip("no UEFI firmware for aarch64 (install qemu-efi-aarch64)")
    image = arm64_image(staged, home, "mkimage")
    layout = imagecheck.layout(image)
    assert layout.label == "gpt"
    esp, rootpart = layout.partitions
    assert rootpart.type.upper() == "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"  # Linux root (ARM-64)
    listing = subprocess.run(["mdir", "-b", "-i", f"{image}@@{esp.start * 512}",
                              "::/EFI/BOOT"], capture_output=True, text=True)
    assert "BOOTAA64.EFI" in listing.stdout, listing.stdout + listing.stderr
    console = imagecheck.boot(image, "uefi", home / "console.log", arch="aarch64",
                              timeout=900)
    lines = imagecheck.marker_lines(console)
    assert lines and lines[-1] == f"{imagecheck.MARKER} done", console[-3000:]
    assert any("esp BOOTAA64.EFI" in line for line in lines), lines


def test_an_aarch64_board_image_by_the_mbr_recipe_boots_with_u_boot(staged, home):
    """recipes/mkimage-mbr.sh for aarch64: an MBR image with one bootable root partition
    and /boot/extlinux/extlinux.conf, which U-Boot's distro boot reads on boards; booted
    under qemu-system-aarch64 with U-Boot (u-boot-qemu) to its marker."""
    if not imagecheck.UBOOT_ARM64.exists():
        pytest.skip("no U-Boot for qemu's arm64 board (install u-boot-qemu)")
    image = arm64_image(staged, home, "mkimage-mbr")
    layout = imagecheck.layout(image)
    assert layout.label == "dos"
    (rootpart,) = layout.partitions
    assert rootpart.bootable
    part = imagecheck.extract(image, rootpart, home / "root.fs")
    conf = imagecheck.ext_cat(part, "/boot/extlinux/extlinux.conf")
    assert "console=ttyAMA0" in conf and "init=/usr/local/sbin/marker" in conf, conf
    part.unlink()
    console = imagecheck.boot(image, "u-boot", home / "console.log", arch="aarch64",
                              timeout=900)
    lines = imagecheck.marker_lines(console)
    assert lines and lines[-1] == f"{imagecheck.MARKER} done", console[-3000:]

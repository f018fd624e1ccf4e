"""The demo behind scripts/demo: a bootable Debian disk image, built by helper-run as an
unprivileged user inside a build root, checked on the host, then booted.

1. a Debian build root (mmdebstrap, cached) with hshelper installed in it;
2. a small Debian system to put on the disk (mmdebstrap, cached): cloud kernel,
   initramfs, systemd-boot; as a tarball with a tiny init that prints a marker;
3. inside the build root, as uid 65534:
   helper-run --recipe mkimage --size 1G --append init=/usr/local/sbin/marker \\
       root.tar demo.img
   (the partition table and the ext4 root are written on the host while the VM boots;
   the VM makes the ESP, the fstab and installs systemd-boot, as root);
4. the image checked on the host: sfdisk -d, fsck -n of both filesystems, the files;
5. the image booted with UEFI firmware (OVMF) under QEMU until the marker appears.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import buildroots  # noqa: E402
import chroot  # noqa: E402
import imagecheck  # noqa: E402

COMMAND = ["helper-run", "--recipe", "mkimage", "--size", "1G",
           "--append", "init=/usr/local/sbin/marker", "root.tar", "demo.img"]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def prepare(root: Path, work: str) -> Path:
    """The build user's directory with root.tar in it."""
    host = root / work.lstrip("/")
    target = buildroots.ensure_root("target-bookworm")
    imagecheck.target_tarball(target, host / "root.tar")
    subprocess.run(["chown", "-R", f"{chroot.BUILD_UID}:{chroot.BUILD_UID}", str(host)],
                   check=True)
    return host


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip("\n").splitlines())


def check(image: Path, tmp: Path) -> str:
    """Print what the host sees in the image; return the root partition's PARTUUID."""
    print(imagecheck.sfdisk_dump(image), end="")
    esp, rootp = imagecheck.layout(image).partitions
    esp_img = imagecheck.extract(image, esp, tmp / "esp.img")
    root_img = imagecheck.extract(image, rootp, tmp / "root.img")
    for part, kind in ((esp_img, "vfat"), (root_img, "ext4")):
        proc = imagecheck.fsck(part, kind)
        print(f"fsck -n ({kind}): {'clean' if proc.returncode == 0 else 'ERRORS'}")
        if proc.returncode != 0:
            raise SystemExit(f"demo: fsck found errors in the {kind} partition:\n{proc.stdout}")
    print("ESP /EFI/BOOT:", " ".join(imagecheck.fat_ls(esp_img, "/EFI/BOOT")))
    print("ESP /loader/entries/linux.conf:")
    print(indent(imagecheck.fat_cat(esp_img, "/loader/entries/linux.conf")))
    print("root /etc/fstab:")
    print(indent(imagecheck.ext_cat(root_img, "/etc/fstab")))
    return rootp.uuid.lower()


def main() -> int:
    step("the build root (Debian 12 with hshelper; made by mmdebstrap once, then reused)")
    root = buildroots.ensure_root("bookworm")
    chroot.install(root)
    work = chroot.fresh_dir(root, "demo")
    step("the system to put on the disk (Debian 12, cloud kernel, systemd-boot), as a tarball")
    host = prepare(root, work)
    print(f"{host / 'root.tar'}: {(host / 'root.tar').stat().st_size / 1e6:.0f} MB")
    step(f"as uid {chroot.BUILD_UID} in the build root ({work}): {' '.join(COMMAND)}")
    with chroot.proc_mounted(root):
        proc = chroot.run(root, COMMAND, cwd=work, capture=False, timeout=1200)
    if proc.returncode != 0:
        print(f"demo: helper-run failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    image = host / "demo.img"
    step(f"the image, checked on the host: {image} (owner uid {image.stat().st_uid})")
    with tempfile.TemporaryDirectory(prefix="hshelper-demo-") as tmp:
        partuuid = check(image, Path(tmp))
        step("booting it: QEMU (TCG) with UEFI firmware (OVMF); the serial console's marker")
        console = imagecheck.boot(image, "uefi", Path(tmp) / "console.log")
    lines = imagecheck.marker_lines(console)
    for line in lines:
        print(line)
    if not any(line.endswith("done") for line in lines) or partuuid not in console:
        print("demo: the image did not boot to the marker; console tail:\n" + console[-2000:],
              file=sys.stderr)
        return 1
    print(f"\ndemo: {image.name} booted from its own disk (root=PARTUUID={partuuid}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

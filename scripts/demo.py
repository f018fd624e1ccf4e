"""The demo behind scripts/demo: a disk image built by helper-run in a build root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import buildroots  # noqa: E402
import chroot  # noqa: E402

SCRIPT = """set -e
dev=$HSHELPER_DISK_OUT
echo "partitioning $dev (GPT: 64 MiB EFI system partition, the rest Linux)"
printf 'label: gpt\\n,64M,U\\n,,L\\n' | sfdisk -q "$dev"
mkfs.vfat -n ESP "${dev}1" >/dev/null
mkfs.ext4 -q -L root "${dev}2"
mount "${dev}2" /mnt
echo "made by hshelper inside a VM, as uid $(id -u) there" > /mnt/README
umount /mnt
echo done
"""


def main() -> int:
    root = buildroots.ensure_root("bookworm")
    chroot.install(root)
    work = chroot.fresh_dir(root, "demo")
    print(f"build root: {root}; running as uid {chroot.BUILD_UID} in {work}", flush=True)
    with chroot.proc_mounted(root):
        proc = chroot.run(root, ["helper-run", "-v", "--disk",
                                 "demo.img,size=256M,name=out", "sh", "-c", SCRIPT],
                          cwd=work, capture=False, timeout=600)
    if proc.returncode != 0:
        print(f"demo: helper-run failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    image = root / work.lstrip("/") / "demo.img"
    print(f"\nthe image, checked on the host: {image} (owner uid {image.stat().st_uid})")
    subprocess.run(["sfdisk", "-d", str(image)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``helper-run --report FILE.json``: the report checked against the files on disk, for a
successful run with raw and qcow2 disks and extra artifacts, a failing command, a
declared artifact that was not made, and a skipped run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import chroot
import pytest

from hshelper import report
from hshelper.model import Accel, Disk, RunResult, RunSpec

# ------------------------------------------------------------------ pure functions


def test_expand_patterns_and_unique(tmp_path):
    (tmp_path / "a-1.txt").write_text("1")
    (tmp_path / "a-2.txt").write_text("22")
    (tmp_path / "sub").mkdir()
    found, missing = report.expand_patterns(["a-*.txt", "nope-*", "sub"], str(tmp_path))
    assert [a.path.name for a in found] == ["a-1.txt", "a-2.txt"]
    assert missing == ["nope-*", "sub"]  # a directory is not an artifact
    disk = report.Artifact(tmp_path / "a-1.txt", "disk", "raw")
    assert len(report.unique([disk, *found])) == 2


def test_build_report_hashes_what_is_on_disk(tmp_path):
    image = tmp_path / "out.img"
    image.write_bytes(b"\x55" * 4096)
    spec = RunSpec(argv=("sh", "-c", "x"), cwd=str(tmp_path), env=(),
                   disks=(Disk(image, "out"), Disk(tmp_path / "in.img", "in", readonly=True)))
    result = RunResult(status=0, reason="", accel=Accel("tcg", "asked for TCG"),
                       seconds=2.5, boot_seconds=1.25, console_log=None)
    data = report.build_report(spec, result, None, str(tmp_path),
                               report.disk_artifacts(spec.disks), [], 1.0e9, 1.0e9 + 3,
                               3.0)
    assert data["ok"] and data["status"] == 0 and data["kernel"] is None
    assert data["started"] == "2001-09-09T01:46:40Z"
    [art] = data["artifacts"]  # the read-only disk is an input
    assert art["path"] == "out.img" and art["size"] == 4096
    assert art["sha256"] == hashlib.sha256(b"\x55" * 4096).hexdigest()
    json.dumps(data)  # all of it serialisable


def test_disk_artifacts_follow_a_recipe_output_and_skip_a_removed_disk(tmp_path):
    """A recipe attaches OUTPUT.part and renames it OUTPUT when done (helper-run
    --recipe mkimage): the report lists OUTPUT. A disk removed after a failure is not
    listed (it used to be an internal error of the report plugin)."""
    (tmp_path / "disk.img").write_bytes(b"done")
    disks = (Disk(tmp_path / "disk.img.part", "out"), Disk(tmp_path / "gone.img", "gone"),
             Disk(tmp_path / "other.img.part", "other"))
    found = report.disk_artifacts(disks)
    assert [(a.path, a.kind) for a in found] == [(tmp_path / "disk.img", "disk")]


def test_a_disk_renamed_when_complete_is_listed_by_its_final_name(tmp_path):
    """The image recipes attach OUTPUT.part and rename it to OUTPUT at the end; a
    failed one removes OUTPUT.part."""
    (tmp_path / "disk.img").write_bytes(b"img")
    disks = (Disk(tmp_path / "disk.img.part", "out"), Disk(tmp_path / "gone.img.part", "g"),
             Disk(tmp_path / "gone.img", "h"))
    assert [a.path.name for a in report.disk_artifacts(disks)] == ["disk.img"]


# ------------------------------------------------------------------ real runs


def helper_run(root, work, *argv, **kwargs):
    return chroot.run(root, ["helper-run", *argv], cwd=work, **kwargs)


def check_artifacts(data: dict, host_dir: Path) -> None:
    """Every listed artifact against the file on disk: size and sha256 recomputed."""
    for art in data["artifacts"]:
        path = host_dir / art["path"]
        assert path.stat().st_size == art["size"], art
        assert hashlib.sha256(path.read_bytes()).hexdigest() == art["sha256"], art
        assert art["absolute_path"] == os.path.join(data["cwd"], art["path"]), art
        assert art["allocated"] == path.stat().st_blocks * 512, art


def accelerator(root) -> str:
    out = chroot.run(root, ["hshelper", "info"]).stdout.decode()
    return out.split("accelerator: ", 1)[1].split()[0]


@pytest.mark.slow
@pytest.mark.vm
def test_report_of_a_successful_run(root):
    work = chroot.fresh_dir(root, "report-ok")
    host = root / work.lstrip("/")
    script = ('set -e; mkfs.ext4 -q -L rel "$HSHELPER_DISK_RAW"; '
              'mkfs.vfat -n REL "$HSHELPER_DISK_QCOW" >/dev/null; '
              'echo notes > notes-1.txt; echo more > notes-2.txt')
    proc = helper_run(root, work, "--report", "out/report.json",
                      "--disk", "rel.img,size=48M,name=raw",
                      "--disk", "rel.qcow2,size=48M,name=qcow",
                      "--disk", "input.img,size=1M,name=input,ro",
                      "--artifact", "notes-*.txt", "--artifact", "rel.img",
                      "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads((host / "out/report.json").read_text())
    assert data["status"] == 0 and data["ok"] and not data["skipped"]
    assert data["command"] == ["sh", "-c", script] and data["cwd"] == work
    # A read-only disk is an input; rel.img, named twice, is listed once.
    names = [(a["path"], a["kind"], a["format"]) for a in data["artifacts"]]
    assert names == [("rel.img", "disk", "raw"), ("rel.qcow2", "disk", "qcow2"),
                     ("notes-1.txt", "file", None), ("notes-2.txt", "file", None)]
    check_artifacts(data, host)
    # qcow2 really is qcow2, and the raw disk really holds the filesystem made in the VM
    assert (host / "rel.qcow2").read_bytes()[:4] == b"QFI\xfb"
    assert (host / "rel.img").read_bytes()[1024 + 56:1024 + 58] == b"\x53\xef"  # ext magic
    version = sorted(p.name for p in (root / "lib/modules").iterdir())[-1]
    assert data["kernel"]["version"] == version
    # No /dev/kvm in the build root: TCG, and the report says why.
    assert data["accelerator"]["name"] == "tcg"
    assert data["accelerator"]["reason"].startswith("/dev/kvm does not exist")
    t = data["timings"]
    assert 0 < t["boot_seconds"] < t["vm_seconds"] <= t["total_seconds"]
    assert t["image_seconds"] >= 0 and isinstance(t["image_cached"], bool)
    assert data["started"] <= data["finished"]
    assert (host / "out/report.json").stat().st_uid == chroot.BUILD_UID
    assert not [n for n in os.listdir(host / "out") if n.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.vm
def test_report_of_a_failing_command_and_of_a_missing_artifact(root):
    work = chroot.fresh_dir(root, "report-fail")
    host = root / work.lstrip("/")
    proc = helper_run(root, work, "--report", "r.json", "sh", "-c", "echo x > a.txt; exit 7")
    assert proc.returncode == 7
    data = json.loads((host / "r.json").read_text())
    assert data["status"] == 7 and not data["ok"] and data["artifacts"] == []
    proc = helper_run(root, work, "--report", "r.json", "--artifact", "a.txt",
                      "--artifact", "never-made.img", "true")
    assert proc.returncode == 125
    assert b"never-made.img" in proc.stderr and len(proc.stderr.splitlines()) == 1
    data = json.loads((host / "r.json").read_text())
    assert data["status"] == 0 and not data["ok"]
    assert data["missing_artifacts"] == ["never-made.img"]
    assert [a["path"] for a in data["artifacts"]] == ["a.txt"]
    check_artifacts(data, host)


@pytest.mark.slow
def test_report_of_a_skipped_run_and_from_the_environment(root):
    work = chroot.fresh_dir(root, "report-skip")
    host = root / work.lstrip("/")
    if accelerator(root) == "kvm":
        pytest.skip("KVM works here, so --kvm=cond runs instead of skipping")
    proc = helper_run(root, work, "--kvm=cond", "sh", "-c", "exit 3",
                      env={"HSHELPER_REPORT_FILE": "skip.json"})
    assert proc.returncode == 0
    data = json.loads((host / "skip.json").read_text())
    assert data["skipped"] and data["status"] == 0 and data["ok"]
    assert data["reason"].startswith("skipped: no working KVM")
    assert data["accelerator"]["name"] == "tcg" and data["artifacts"] == []


@pytest.mark.slow
@pytest.mark.vm
def test_report_after_a_timeout_and_after_a_panic(root):
    """Written when hshelper chose the status too, with its reason; the VM's size and
    the kernel booted as given."""
    work = chroot.fresh_dir(root, "report-bad-ends")
    host = root / work.lstrip("/")
    version = sorted(p.name for p in (root / "lib/modules").iterdir())[-1]
    proc = helper_run(root, work, "--report", "timeout.json", "--timeout", "3",
                      "--memory", "300", "--cpus", "1", "sh", "-c", "sleep 100")
    assert proc.returncode == 124, proc.stderr.decode()
    data = json.loads((host / "timeout.json").read_text())
    assert data["schema"] == 1 and data["status"] == 124 and not data["ok"]
    assert data["reason"].startswith("timed out"), data["reason"]
    assert (data["memory_mb"], data["cpus"]) == (300, 1)
    assert data["kernel"] == {"version": version, "image": f"/boot/vmlinuz-{version}"}
    proc = helper_run(root, work, "--report", "panic.json", "sh", "-c",
                      "echo c > /proc/sysrq-trigger")
    assert proc.returncode == 125, proc.stderr.decode()
    data = json.loads((host / "panic.json").read_text())
    assert data["status"] == 125 and not data["ok"]
    assert "panic" in data["reason"], data["reason"]

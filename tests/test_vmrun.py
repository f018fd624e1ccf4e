"""vm-run's options (plugin vmrun): how they parse into hshelper's own, and real runs
with them in the bookworm build root, as the build user, under TCG here."""

from __future__ import annotations

import resource

import chroot
import pytest
from hshelper.plugins import vmrun

from hshelper.cli import Session
from hshelper.errors import HshelperError


def parse(*argv: str):
    return Session(list(argv), "helper-run").parser().parse_args(list(argv))


# ------------------------------------------------------------------ parsing (no VM)

@pytest.mark.parametrize("mode,accel,skip", [
    ("cond", "auto", True), ("only", "kvm", False), ("always", "kvm", False),
    ("try", "auto", False), ("any", "auto", False), ("no", "tcg", False),
])
def test_kvm_modes_map_onto_accel_and_skip(mode, accel, skip):
    args = parse(f"--kvm={mode}", "true")
    assert (args.accel, args.skip_without_kvm) == (accel, skip)


@pytest.mark.parametrize("text,mib", [("512", 512), ("768M", 768), ("2G", 2048),
                                      ("1g", 1024), ("1GiB", 1024), ("262144K", 256)])
def test_mem_sizes(text, mib):
    assert vmrun.parse_mem(text) == mib
    assert parse(f"--mem={text}", "true").memory == mib


@pytest.mark.parametrize("text", ["abc", "1.5G", "64M", "", "-1"])
def test_bad_mem_is_one_line_exit_2(text):
    with pytest.raises(HshelperError) as info:
        vmrun.parse_mem(text)
    assert info.value.status == 2 and "\n" not in str(info.value)


def test_mem_max_is_half_the_available_memory_within_rlimit():
    assert vmrun.max_memory(8000, resource.RLIM_INFINITY) == 4000
    assert vmrun.max_memory(8000, 1400 * 2**20) == 1000  # 400 MiB left for qemu itself
    assert vmrun.max_memory(100, resource.RLIM_INFINITY) == vmrun.MIN_MEMORY
    assert vmrun.parse_mem("max") >= vmrun.MIN_MEMORY


def test_cpu_modules_sbin_append():
    args = parse("--cpu=2", "--modules=isofs,squashfs", "--module", "loop", "--sbin",
                 "--append=quiet", "true")
    assert args.cpus == 2 and args.sbin and args.append == ["quiet"]
    assert args.with_modules == ["isofs", "squashfs", "loop"]
    assert parse("--cpu=max", "true").cpus >= 1
    with pytest.raises(HshelperError):
        parse("--cpu=zero", "true")


def test_heredoc_implies_sh_reading_stdin():
    args = parse("--heredoc")
    assert args.command == [] and args.implied_command == ("sh", "-s")


def test_shell_text_runs_with_sh(tmp_path):
    assert vmrun.shell_command(("date; date",), str(tmp_path)) == ("sh", "-c", "date; date")
    assert vmrun.shell_command(("make", "check"), str(tmp_path)) == ("make", "check")
    assert vmrun.shell_command(("true",), str(tmp_path)) == ("true",)
    (tmp_path / "my script").write_text("")
    assert vmrun.shell_command(("my script",), str(tmp_path)) == ("my script",)


def test_kernel_flavour_match():
    versions = ["6.6.30-un-def-alt1", "6.1.90-std-def-alt1"]
    assert vmrun.flavour_match(versions, "std-def") == "6.1.90-std-def-alt1"
    assert vmrun.flavour_match(versions, "de") is None  # a whole part, not a substring
    assert vmrun.flavour_match(["6.1.0-56-amd64"], "amd64") == "6.1.0-56-amd64"


# ------------------------------------------------------------------ real runs



def kvm_works(root) -> bool:
    out = chroot.run(root, ["hshelper", "info"]).stdout.decode()
    return "accelerator: kvm" in out


@pytest.mark.slow
@pytest.mark.vm
def test_kvm_cond_skips_with_warning_and_kvm_any_runs_under_tcg(root):
    work = chroot.fresh_dir(root, "vmrun-cond")
    cond = chroot.run(root, ["helper-run", "--kvm=cond", "sh", "-c", "echo ran; exit 3"],
                      cwd=work)
    if kvm_works(root):  # a machine with a working KVM runs the step for real
        assert cond.returncode == 3 and cond.stdout == b"ran\n"
        return
    assert cond.returncode == 0, cond.stderr.decode()
    assert cond.stdout == b""
    err = cond.stderr.decode()
    assert "warning: skipping" in err and "no working KVM" in err
    anyway = chroot.run(root, ["helper-run", "-v", "--kvm=any", "sh", "-c",
                               "echo ran; exit 3"], cwd=work)
    assert anyway.returncode == 3 and anyway.stdout == b"ran\n"
    assert "using TCG" in anyway.stderr.decode()


@pytest.mark.slow
@pytest.mark.vm
def test_vm_run_options_reach_the_guest(root):
    """--mem, --cpu, --append, --modules, --sbin and --kernel=FLAVOUR in one run."""
    version = sorted(p.name for p in (root / "lib/modules").iterdir())[-1]
    flavour = version.rsplit("-", 1)[1]  # 6.1.0-56-amd64 -> amd64
    script = ("grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo; "
              "cat /proc/cmdline; uname -r; "
              "test -e /hshelper/modules/isofs.ko && echo isofs-in-image; "
              "command -v sfdisk")
    argv = ["helper-run", "--kvm=try", "--mem=200M", "--cpu=2", "--append=hsh_marker=42",
            "--modules=isofs", "--sbin", f"--kernel={flavour}", "sh", "-c", script]
    proc = chroot.run(root, argv, env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    mem_kib = int(lines[0].split()[1])
    assert 120 * 1024 < mem_kib <= 200 * 1024  # not the default 512M; the kernel keeps some
    assert lines[1] == "2"
    assert "hsh_marker=42" in lines[2].split()
    assert lines[3] == version
    assert lines[4] == "isofs-in-image"
    assert lines[5].endswith("/sbin/sfdisk")
    # Without --modules the module is not in the image: the option did it.
    plain = chroot.run(root, ["helper-run", "sh", "-c", "test -e /hshelper/modules/isofs.ko"])
    assert plain.returncode == 1, plain.stderr.decode()


@pytest.mark.slow
@pytest.mark.vm
def test_heredoc_and_shell_text(root):
    work = chroot.fresh_dir(root, "vmrun-heredoc")
    script = b'set -e\necho "uid=$(id -u)"\nprintf "%s\\n" "$PWD"\necho made > heredoc.out\n'
    proc = chroot.run(root, ["helper-run", "--heredoc"], cwd=work, input=script)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == f"uid=0\n{work}\n"
    made = root / work.lstrip("/") / "heredoc.out"
    assert made.read_text() == "made\n" and made.stat().st_uid == chroot.BUILD_UID
    text = chroot.run(root, ["helper-run", "echo a; echo b >&2; exit 4"], cwd=work)
    assert (text.returncode, text.stdout, text.stderr) == (4, b"a\n", b"b\n")


@pytest.mark.slow
def test_heredoc_without_stdin_is_refused(root):
    """No script on stdin: a clear error, not a shell waiting forever."""
    proc = chroot.run(root, ["helper-run", "--heredoc", "--no-stdin"])
    assert proc.returncode == 2
    assert b"--heredoc reads the script from stdin" in proc.stderr

"""vm-run's options (plugin vmrun): a table over every option vm-run documents, how each
parses into hshelper's own (or is refused), and real runs with them in the bookworm
build root, as the build user, under TCG here."""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import chroot
import pytest
from hshelper.plugins import vmrun

from hshelper.cli import Session
from hshelper.errors import HshelperError
from hshelper.model import RunSpec

DOCS = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def parse(*argv: str):
    return Session(list(argv), "helper-run").parser().parse_args(list(argv))


# What vm-run's usage() lists (rpm-build-vm's vm-run, 2023), plus the options its
# option loop and its checkinstall use beyond that list. Written from vm-run, not from
# the plugin: every one must be handled (mapped, ignored or refused with a reason).
VMRUN_OPTIONS = (
    "--bios", "--cpu", "--drive", "--ext4", "--fat", "--hvc", "--kvm", "--mem", "--microvm",
    "--multidevs", "--overlay", "--qemu", "--rootfs", "--create-rootfs", "--secureboot",
    "-s", "--silent", "--swap", "--tcg", "--uefi", "--append", "--depmod", "--kernel",
    "--kernels", "--no-quiet", "--loglevel", "--modules", "--rdadd", "--no-bind", "--rsync",
    "--sbin", "--sudo", "--user", "--udevd", "--stdout", "--verbose", "--heredoc",
    "--maxcpu", "--initrd", "--tmp", "--no-virtio", "--scsi", "--no-snapshot", "--sandbox",
    "--stub-exit", "-x", "+x", "-e", "+e", "-device", "-m", "-smp", "-machine", "-object",
    "-netdev", "-chardev", "-global", "-blockdev",
)
PLAIN = parse("true")
CORE = ("accel", "skip_without_kvm", "memory", "cpus", "mode", "append", "verbose",
        "with_programs", "with_modules", "kernel", "command")

# (argv before the command, expected): a dict of parsed attributes, "ignored" (parses
# and changes none of the core's options) or "refused" (exit 2 with the reason).
TABLE = [
    *[((f"--kvm={mode}",), {"accel": accel, "skip_without_kvm": skip}) for mode, accel, skip in (
        ("try", "auto", False), ("detect", "auto", False), ("cond", "auto", True),
        ("if", "auto", True), ("only", "kvm", False), ("force", "kvm", False),
        ("enable", "kvm", False), ("any", "auto", False), ("all", "auto", False),
        ("default", "tcg", False), ("no", "tcg", False), ("off", "tcg", False),
        ("false", "tcg", False), ("tcg", "tcg", False), ("", "tcg", False))],
    (("--tcg",), {"accel": "tcg"}),
    (("--mem=512",), {"memory": 512}), (("--mem=768M",), {"memory": 768}),
    (("--mem=2G",), {"memory": 2048}), (("--mem=1.5G",), {"memory": 1536}),
    (("--mem=1GiB",), {"memory": 1024}), (("--mem=262144K",), {"memory": 256}),
    (("--mem=",), {"memory": None}),
    (("--cpu=2",), {"cpus": 2}), (("--maxcpu=8",), {"maxcpu": 8}),
    (("--append=quiet",), {"append": ["quiet"]}),
    (("--kernel=un-def",), {"kernel": "un-def"}), (("--kernels",), {"kernels": True}),
    (("--no-quiet",), {"verbose": True, "append": ["loglevel=7"]}),
    (("--loglevel=5",), {"verbose": True, "append": ["loglevel=5"]}),
    (("--loglevel=debug",), {"verbose": True, "append": ["ignore_loglevel"]}),
    (("--modules=isofs squashfs",), {"with_modules": ["isofs", "squashfs"]}),
    (("--initrd",), {"mode": "image"}), (("--verbose",), {"verbose": True}),
    (("--heredoc",), {"implied_command": ("sh", "-s")}),
    (("-x",), {"shell_options": ["-x"]}), (("+x",), {"shell_options": ["+x"]}),
    (("-e",), {"shell_options": ["-e"]}), (("+e",), {"shell_options": ["+e"]}),
    (("+ex", "-x"), {"shell_options": ["+ex", "-x"]}),
    *[((word,), "ignored") for word in (
        "--sbin", "-s", "--silent", "--stdout", "--depmod", "--swap", "--hvc",
        "--multidevs=remap", "--sandbox=off", "--stub-exit=0")],
    *[((word,), "refused") for word in (
        "--bios=uefi", "--uefi", "--secureboot", "--microvm", "--drive=x.img", "--ext4",
        "--ext4=metadata_csum", "--fat=dir", "--overlay=ext4", "--qemu=-rtc clock=vm",
        "--rootfs", "--rootfs=x.img", "--create-rootfs=x.img", "--rdadd=/bin/ls",
        "--no-bind", "--rsync=dir", "--sudo", "--user", "--udevd", "--tmp=max",
        "--no-virtio", "--scsi", "--no-snapshot")],
    *[((opt, "x"), "refused") for opt in (
        "-device", "-m", "-smp", "-machine", "-object", "-netdev", "-chardev", "-global",
        "-blockdev")],
]


def test_the_table_covers_every_option_vm_run_documents():
    covered = {re.split(r"=", argv[0])[0] for argv, _ in TABLE}
    assert set(VMRUN_OPTIONS) - covered == set()


@pytest.mark.parametrize("argv,expected", TABLE, ids=[" ".join(a) for a, _ in TABLE])
def test_every_vm_run_option(argv, expected):
    if expected == "refused":
        with pytest.raises(HshelperError) as info:
            parse(*argv, "true")
        message = str(info.value)
        assert info.value.status == 2 and "\n" not in message
        assert argv[0].split("=")[0] in message
        return
    args = parse(*argv, "true")
    assert args.command == ["true"]
    if expected == "ignored":
        assert {k: getattr(args, k) for k in CORE} == {k: getattr(PLAIN, k) for k in CORE}
        return
    for attr, value in expected.items():
        assert getattr(args, attr) == value, attr


def test_every_vm_run_option_has_a_row_in_the_docs_table():
    text = DOCS.read_text().split("## ALT vm-run users", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = " ".join(row.split(" | ")[0] for row in rows)
    missing = [o for o in VMRUN_OPTIONS if f"`{o}" not in documented]
    assert missing == []


@pytest.mark.parametrize("command", [
    ["sh", "-c", "x"], ["sh", "-e", "-x", "-c", "y"], ["ls", "-a", "-n", "-f", "-t", "-r"],
    ["mkfs.ext4", "-m", "0", "disk.img"], ["chmod", "+x", "f"], ["date", "+%s"],
    ["qemu-img", "info", "-cpu", "--disk"],
])
def test_a_commands_own_options_stay_its_own(command):
    """vm-run's -x/+e and raw qemu names (-cpu, -m) are options only before CMD, and no
    word of the command is taken for an abbreviation of one (-c of -cpu, -chardev)."""
    args = parse("-v", *command)
    assert args.command == command and args.verbose


def test_an_unknown_kvm_mode_is_a_usage_error():
    with pytest.raises(HshelperError, match="--kvm=sometimes: unknown mode") as info:
        parse("--kvm=sometimes", "true")
    assert info.value.status == 2


@pytest.mark.parametrize("text", ["abc", "64M", "-1", "1.5K", "0"])
def test_bad_mem_is_one_line_exit_2(text):
    with pytest.raises(HshelperError) as info:
        vmrun.parse_mem(text)
    assert info.value.status == 2 and "\n" not in str(info.value)


def test_mem_max_is_half_the_available_memory_within_rlimit():
    assert vmrun.max_memory(8000, resource.RLIM_INFINITY) == 4000
    assert vmrun.max_memory(8000, 1400 * 2**20) == 1000  # 400 MiB left for qemu itself
    assert vmrun.max_memory(100, resource.RLIM_INFINITY) == vmrun.MIN_MEMORY


def test_cpu_max_is_every_cpu_this_process_may_use():
    assert parse("--cpu=max", "true").cpus == len(os.sched_getaffinity(0))
    with pytest.raises(HshelperError):
        parse("--cpu=zero", "true")
    with pytest.raises(HshelperError):
        parse("--cpu=0", "true")


@pytest.mark.parametrize("words,flags", [
    ((), ("-e", "-x")),  # vm-run's default: set -ex
    (("+x",), ("-e",)), (("+e",), ("-x",)), (("+ex",), ()), (("+xe",), ()),
    (("+ex", "-x"), ("-x",)), (("+e", "-e"), ("-e", "-x")), (("-xe",), ("-e", "-x")),
    (("+xx",), ("-e",)),
])
def test_shell_options_fold_as_set_reads_them(words, flags):
    assert vmrun.shell_flags(words) == flags


def test_shell_text_runs_with_sh_and_the_shell_options(tmp_path):
    cwd = str(tmp_path)
    assert vmrun.shell_command(("date; date",), cwd) == ("sh", "-e", "-x", "-c", "date; date")
    assert vmrun.shell_command(("a && b",), cwd, ("-e",)) == ("sh", "-e", "-c", "a && b")
    assert vmrun.shell_command(("a | b",), cwd, ()) == ("sh", "-c", "a | b")
    assert vmrun.shell_command(("make", "check"), cwd) == ("make", "check")
    assert vmrun.shell_command(("true",), cwd) == ("true",)
    (tmp_path / "my script").write_text("")
    assert vmrun.shell_command(("my script",), cwd) == ("my script",)


class _Config:
    def __init__(self, cpus: int):
        self.cpus = cpus

    def get(self, section, name):
        return {("run", "cpus"): self.cpus}[(section, name)]


def test_maxcpu_bounds_the_default_count_not_an_asked_one():
    spec = RunSpec(argv=("true",), cwd="/", env=(), cpus=2)
    bounded = vmrun.hshelper_run_spec(spec, _Config(0), parse("--maxcpu=1", "true"))
    assert bounded.cpus == 1
    asked = vmrun.hshelper_run_spec(spec, _Config(2), parse("--maxcpu=1", "--cpu=2", "true"))
    assert asked.cpus == 2


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
def test_command_text_stops_at_the_first_failure_and_traces_to_stderr(root):
    """vm-run's default -ex: `false; echo still-ran` fails, still-ran never runs."""
    work = chroot.fresh_dir(root, "vmrun-shellopts")
    failed = chroot.run(root, ["helper-run", "false; echo still-ran"], cwd=work)
    assert failed.returncode == 1, failed.stderr.decode()
    assert failed.stdout == b""
    assert failed.stderr.decode().splitlines() == ["+ false"]
    # +e: the shell goes on, as vm-run +e does; the trace stays.
    on = chroot.run(root, ["helper-run", "+e", "false; echo still-ran"], cwd=work)
    assert (on.returncode, on.stdout) == (0, b"still-ran\n"), on.stderr.decode()
    assert on.stderr.decode().splitlines() == ["+ false", "+ echo still-ran"]
    # +x: no trace; -e still stops it.
    quiet = chroot.run(root, ["helper-run", "+x", "echo a; false; echo b"], cwd=work)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (1, b"a\n", b"")
    # A command of several words is no shell text: it runs as it is, untraced.
    plain = chroot.run(root, ["helper-run", "sh", "-c", "false; echo still-ran"], cwd=work)
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, b"still-ran\n", b"")


@pytest.mark.slow
@pytest.mark.vm
def test_every_kvm_spelling_and_tcg_for_real(root):
    """Without a working KVM (none in the build root here): cond/if skip with a
    warning, only/force/enable fail with the reason, every other spelling runs on TCG."""
    if kvm_works(root):
        pytest.skip("KVM works on this machine: the no-KVM outcomes cannot be seen")
    work = chroot.fresh_dir(root, "vmrun-kvm")
    command = ["sh", "-c", "echo ran; exit 3"]
    for spelling in ("--kvm=cond", "--kvm=if"):
        skipped = chroot.run(root, ["helper-run", spelling, *command], cwd=work)
        assert (skipped.returncode, skipped.stdout) == (0, b""), spelling
        assert "warning: skipping" in skipped.stderr.decode(), spelling
    for spelling in ("--kvm=only", "--kvm=force", "--kvm=enable"):
        refused = chroot.run(root, ["helper-run", spelling, *command], cwd=work)
        assert refused.returncode == 125, spelling
        assert "KVM was asked for but does not work" in refused.stderr.decode()
    for spelling in ("--kvm=try", "--kvm=detect", "--kvm=any", "--kvm=all",
                     "--kvm=default", "--kvm=no", "--kvm=off", "--kvm=false", "--tcg"):
        ran = chroot.run(root, ["helper-run", spelling, *command], cwd=work)
        assert (ran.returncode, ran.stdout) == (3, b"ran\n"), (spelling, ran.stderr)


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
def test_no_quiet_shows_the_boot_messages(root):
    loud = chroot.run(root, ["helper-run", "--no-quiet", "true"])
    assert loud.returncode == 0, loud.stderr.decode()
    assert b"Linux version" in loud.stderr
    quiet = chroot.run(root, ["helper-run", "-v", "true"])
    assert quiet.returncode == 0 and b"Linux version" not in quiet.stderr


def test_verbose_streams_the_kernel_log(root):
    """-v: the kernel's console on stderr (what the kernel logs at its console level,
    here a critical line the command writes to /dev/kmsg); without -v, none of it."""
    note = ["sh", "-c", "printf '<2>hsh-%s\\n' kernel-note >/dev/kmsg"]
    verbose = chroot.run(root, ["helper-run", "-v", *note])
    assert verbose.returncode == 0, verbose.stderr.decode()
    assert b"hsh-kernel-note" in verbose.stderr
    plain = chroot.run(root, ["helper-run", *note])
    assert plain.returncode == 0 and b"hsh-kernel-note" not in plain.stderr


@pytest.mark.slow
@pytest.mark.vm
def test_heredoc_and_shell_text(root):
    work = chroot.fresh_dir(root, "vmrun-heredoc")
    script = b'echo "uid=$(id -u)"\nprintf "%s\\n" "$PWD"\necho made > heredoc.out\n'
    proc = chroot.run(root, ["helper-run", "+x", "--heredoc"], cwd=work, input=script)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == f"uid=0\n{work}\n"
    made = root / work.lstrip("/") / "heredoc.out"
    assert made.read_text() == "made\n" and made.stat().st_uid == chroot.BUILD_UID
    # The script runs under -ex too: the failing line ends it, traced.
    failing = chroot.run(root, ["helper-run", "--heredoc"], cwd=work,
                         input=b"echo one\nfalse\necho two\n")
    assert (failing.returncode, failing.stdout) == (1, b"one\n")
    assert failing.stderr.decode().splitlines() == ["+ echo one", "+ false"]
    text = chroot.run(root, ["helper-run", "+x", "echo a; echo b >&2; exit 4"], cwd=work)
    assert (text.returncode, text.stdout, text.stderr) == (4, b"a\n", b"b\n")


@pytest.mark.slow
def test_heredoc_without_stdin_is_refused(root):
    """No script on stdin: a clear error, not a shell waiting forever."""
    proc = chroot.run(root, ["helper-run", "--heredoc", "--no-stdin"])
    assert proc.returncode == 2
    assert b"--heredoc reads the script from stdin" in proc.stderr


@pytest.mark.slow
def test_kernels_lists_the_build_roots_kernels_without_a_vm(root):
    # qemu /bin/false: any attempt to boot would fail the command.
    proc = chroot.run(root, ["helper-run", "--qemu", "/bin/false", "--kernels"])
    assert proc.returncode == 0, proc.stderr.decode()
    listed = {line.split("\t")[0] for line in proc.stdout.decode().splitlines()}
    assert listed == {p.name for p in (root / "lib/modules").iterdir()}

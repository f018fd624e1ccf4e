"""The command line a packager meets: --version, --help (and its man page), usage errors
(exit 2, one line, nothing started), a closed stdout, `hshelper info`'s left-out
programs, a recipe's --help without a VM, and the config files. Real programs: the
build user in the bookworm build root, help2man on the host's entry points."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import chroot
import pytest

from hshelper import __version__

BIN = Path(sys.executable).parent  # the host's hshelper and helper-run (the venv's)
COMMANDS = ("build", "run", "shell", "info", "plugins", "config", "clean", "recipes")


def host(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, timeout=60,
                          **kwargs)


# ------------------------------------------------------------------ --version, --help

def test_version_on_both_programs():
    assert host("helper-run", "--version").stdout.decode() == \
        f"helper-run (hshelper) {__version__}\n"
    assert host("hshelper", "--version").stdout.decode() == f"hshelper {__version__}\n"
    build = host("hshelper", "build", "--version")
    assert (build.returncode, build.stdout.decode()) == (0, f"hshelper {__version__}\n")


@pytest.mark.parametrize("argv", [["helper-run"], *[["hshelper", c] for c in COMMANDS]],
                         ids=lambda a: " ".join(a))
def test_every_help_has_a_purpose_the_exit_statuses_and_the_files(argv):
    proc = host(*argv, "--help")
    assert proc.returncode == 0 and proc.stderr == b""
    text = proc.stdout.decode()
    paragraphs = text.split("\n\n")
    assert paragraphs[0].startswith(f"Usage: {' '.join(argv)} [OPTIONS]")
    # The description: sentences, not an option list.
    assert len(paragraphs[1]) > 60 and not paragraphs[1].lstrip().startswith("-")
    status = text.split("Exit status:\n", 1)[1].split("\n\n", 1)[0]
    codes = [line.split()[0] for line in status.splitlines() if line.startswith("  ") and
             line.split()[0][0].isdigit()]
    assert {"2", "124", "125", "126", "127", "130", "141", "143"} <= set(codes)
    assert "/etc/hshelper/config.toml" in text and "hshelper.toml" in text
    assert "HSHELPER_SECTION_KEY" in text
    assert all(len(line) <= 79 for line in text.splitlines()
               if not line.startswith("  helper-run --disk")), "lines wider than 79"


def test_the_main_help_lists_every_command_with_examples():
    proc = host("hshelper", "--help")
    text = proc.stdout.decode()
    assert proc.returncode == 0 and text.startswith("Usage: hshelper COMMAND")
    commands = text.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in commands.splitlines()] == list(COMMANDS)
    assert "Examples:\n  helper-run" in text
    no_command = host("hshelper")
    assert no_command.returncode == 2 and len(no_command.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("help2man") is None, reason="help2man is not installed")
@pytest.mark.parametrize("program", ["helper-run", "hshelper"])
def test_help2man_makes_a_manual_page_with_the_sections(program, tmp_path):
    page = tmp_path / f"{program}.1"
    subprocess.run(["help2man", "--no-info", "--output", str(page), str(BIN / program)],
                   check=True, timeout=60)
    text = page.read_text()
    assert f'"hshelper {__version__}"' in text.splitlines()[1]
    sections = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith(".SH")]
    assert sections[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"]
    assert {"ENVIRONMENT", "FILES", "EXAMPLES"} <= set(sections)
    assert "Exit status:" in text and "/etc/hshelper/config.toml" in text
    if program == "helper-run":
        # Every option became an option paragraph (none swallowed into another's text).
        assert "\\fB\\-\\-kvm\\fR MODE" in text and "\\fB\\-\\-guest\\-fill\\fR" in text


# ------------------------------------------------------------------ usage errors

# Every option and --set with a bad value: exit 2, one line, before anything starts.
RUN_ERRORS = [
    ["--timeout", "-5"], ["--timeout", "0"], ["--timeout", "soon"], ["--timeout", "nan"],
    ["--memory", "0"], ["--memory", "-1"], ["--memory", "64"], ["--memory", "lots"],
    ["--cpus", "0"], ["--cpus", "-2"], ["--cpus", "two"], ["--mem=0"], ["--mem=lots"],
    ["--cpu=0"], ["--maxcpu=0"], ["--accel", "fast"], ["--mode", "vm"],
    ["--kvm=sometimes"], ["--compression", "lz4"], ["--qemu=-rtc clock=vm"], ["--rootfs"],
    ["-device", "virtio-rng-pci"], ["--bogus"], ["--disk", "x.img,size=0"],
    ["--disk", "x.img,colour=red"], ["--disk", "missing.img"], ["--share", "/nonexistent"],
    ["--set", "run.memory=lots"], ["--set", "run.memory=-1"], ["--set", "run.timeout=-5"],
    ["--set", "run.cpus=-1"], ["--set", "image.compression=lz4"], ["--set", "run.mode=vm"],
    ["--set", "nosuch.key=1"], ["--set", "novalue"], ["--config", "/nonexistent.toml"],
    ["-p", "no:nosuchplugin"], ["-p", "no:core"], ["-p", "heartbeat"],
    ["--sysroot", "/nonexistent"], ["--recipe", "nosuch"], ["--heredoc", "--no-stdin"],
]
OTHER_ERRORS = [
    ["hshelper", "bogus"], ["hshelper", "build", "--compression", "lz4"],
    ["hshelper", "build", "--set", "image.compression=lz4"], ["hshelper", "info", "--bogus"],
    ["hshelper", "config", "--set", "run.timeout=-1"],
    ["hshelper", "clean", "--config", "/nonexistent.toml"], ["helper-run"],
    ["helper-run", "--heredoc", "--no-stdin"],
]


@pytest.mark.slow
def test_every_usage_error_is_exit_2_in_one_line_with_nothing_started(root):
    work = chroot.fresh_dir(root, "usage")
    runs_before = set((root / "tmp").glob("hshelper-run-*"))
    cases = [["helper-run", *opts, "--disk", "new.img,size=1M", "true"]
             for opts in RUN_ERRORS] + OTHER_ERRORS
    for argv in cases:
        proc = chroot.run(root, argv, cwd=work, stdin=subprocess.DEVNULL)
        err = proc.stderr.decode()
        assert proc.returncode == 2, (argv, proc.returncode, err)
        assert err.startswith("hshelper: ") and err.count("\n") == 1, (argv, err)
        assert proc.stdout == b"", argv
        assert not (root / work.lstrip("/") / "new.img").exists(), argv
    assert set((root / "tmp").glob("hshelper-run-*")) == runs_before


@pytest.mark.slow
def test_a_bad_config_file_or_variable_is_125_not_a_usage_error(root):
    """The line between the two: what the command line says is usage (2); a config
    file or HSHELPER_* variable is the setup's (125). Both one line, naming the origin."""
    work = chroot.fresh_dir(root, "badconfig")
    env = chroot.run(root, ["helper-run", "true"], cwd=work,
                     env={"HSHELPER_RUN_MEMORY": "lots"})
    assert env.returncode == 125 and env.stderr.decode().count("\n") == 1
    assert "environment: run.memory must be a size" in env.stderr.decode()
    (root / work.lstrip("/") / "hshelper.toml").write_text("[run]\ntimeout = -1\n")
    file = chroot.run(root, ["helper-run", "true"], cwd=work)
    assert file.returncode == 125, file.stderr.decode()
    assert "hshelper.toml: run.timeout must be at least 0" in file.stderr.decode()


# ------------------------------------------------------------------ a closed stdout

def closed_pipe():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before a byte is written
    return write


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["hshelper", "build", "--json"], ["hshelper", "info"],
                                  ["hshelper", "--help"], ["hshelper", "config"],
                                  ["helper-run", "--help"]], ids=lambda a: " ".join(a))
def test_a_reader_that_left_ends_the_command_quietly_with_141(root, argv):
    write = closed_pipe()
    try:
        proc = chroot.run(root, argv, capture=False, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr.decode()
    assert proc.stderr == b""


@pytest.mark.slow
def test_a_shell_pipeline_sees_141_and_no_message(root):
    """As a shell sees it: `true` leaves at once, long before hshelper has its answer."""
    for command in ("hshelper build --json", "hshelper info"):
        proc = chroot.run(root, ["bash", "-c", f"set -o pipefail; {command} | true"])
        assert (proc.returncode, proc.stderr) == (141, b""), proc.stderr.decode()


@pytest.mark.slow
@pytest.mark.vm
def test_a_closed_stdout_under_helper_run_leaves_nothing_behind(root):
    runs_before = set((root / "tmp").glob("hshelper-run-*"))
    write = closed_pipe()
    try:
        proc = chroot.run(root, ["helper-run", "seq", "100000"], capture=False,
                          stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr.decode()
    assert proc.stderr == b""
    assert set((root / "tmp").glob("hshelper-run-*")) == runs_before
    qemus = subprocess.run(["pgrep", "-f", f"qemu-system.*{root}"], capture_output=True)
    assert qemus.stdout == b""


# ------------------------------------------------------------------ answers on the host

def installed(root: Path, name: str) -> bool:
    return any((root / d / name).exists() for d in
               ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"))


@pytest.mark.slow
def test_info_tells_not_installed_from_over_the_budget(root):
    proc = chroot.run(root, ["hshelper", "info"])
    assert proc.returncode == 0, proc.stderr.decode()
    lines = dict(line.split(": ", 1) for line in proc.stdout.decode().splitlines()
                 if ": " in line)
    assert "left out of the image" not in lines  # the old mixed line
    over = lines["left out of the image (over image.program_budget_kb)"].split(", ")
    assert any(re.fullmatch(r"sgdisk \([\d.]+ MB: --with sgdisk\)", item) for item in over)
    over = [item.split(" (")[0] for item in over]
    absent = lines["not installed in the build root"].split(", ")
    assert {"bash", "sgdisk"} <= set(over)
    assert "parted" in absent and "mkfs.xfs" in absent
    assert all(installed(root, name) for name in over), over
    assert not any(installed(root, name) for name in absent), absent
    built = chroot.run(root, ["hshelper", "build", "-v"])
    assert "hshelper: not installed in the build root: " in built.stderr.decode()


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--size", "2G", "--help"]])
@pytest.mark.parametrize("recipe", ["mkimage", "mkimage-mbr"])
def test_a_recipes_help_comes_from_the_host_without_a_vm(root, recipe, args):
    own = chroot.run(root, ["sh", f"/opt/hshelper/hshelper/recipes/{recipe}.sh", "--help"])
    assert own.returncode == 0 and own.stdout.startswith(b"usage: ")
    # qemu /bin/false: any attempt to boot would fail the command.
    proc = chroot.run(root, ["helper-run", "--qemu", "/bin/false", "--recipe", recipe, *args])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == own.stdout and proc.stderr == b""


# ------------------------------------------------------------------ config files

@pytest.mark.slow
def test_config_names_the_files_it_read_in_order(root):
    work = chroot.fresh_dir(root, "configfiles")
    xdg = chroot.fresh_dir(root, "xdg")
    (root / xdg.lstrip("/") / "hshelper").mkdir()
    (root / xdg.lstrip("/") / "hshelper/config.toml").write_text("[run]\ncpus = 1\n")
    (root / work.lstrip("/") / "hshelper.toml").write_text('[run]\nmemory = "1G"\n')
    proc = chroot.run(root, ["hshelper", "config"], cwd=work, env={"XDG_CONFIG_HOME": xdg})
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    files = [line for line in lines if line.startswith("#   /")]
    assert files == ["#   /etc/hshelper/config.toml: not found",
                     f"#   {xdg}/hshelper/config.toml: read",
                     f"#   {work}/hshelper.toml: read"]
    assert f"run.memory = 1024    # {work}/hshelper.toml" in lines
    assert f"run.cpus = 1    # {xdg}/hshelper/config.toml" in lines


@pytest.mark.slow
@pytest.mark.vm
def test_config_memory_takes_the_options_units(root):
    """`[run] memory = "1G"` gives the guest what --mem=1G and --memory 1G give."""
    work = chroot.fresh_dir(root, "configmem")
    (root / work.lstrip("/") / "hshelper.toml").write_text('[run]\nmemory = "1G"\n')
    probe = ["sh", "-c", "grep MemTotal /proc/meminfo"]
    by_file = chroot.run(root, ["helper-run", *probe], cwd=work)
    plain = chroot.fresh_dir(root, "configmem-plain")
    by_mem = chroot.run(root, ["helper-run", "--mem=1G", *probe], cwd=plain)
    by_memory = chroot.run(root, ["helper-run", "--memory", "1G", *probe], cwd=plain)
    by_default = chroot.run(root, ["helper-run", *probe], cwd=plain)
    for proc in (by_file, by_mem, by_memory, by_default):
        assert proc.returncode == 0, proc.stderr.decode()
    kib = int(by_file.stdout.split()[1])
    assert 900 * 1024 < kib <= 1024 * 1024
    assert by_file.stdout == by_mem.stdout == by_memory.stdout
    assert int(by_default.stdout.split()[1]) <= 512 * 1024  # the file made the difference

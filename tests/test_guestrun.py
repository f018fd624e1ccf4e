"""The per-run shell text, executed by real shells: argv and environment arrive exactly."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hshelper import guestrun
from hshelper.model import RunSpec

NASTY = ["plain", "with space", "quote's", 'dq"', "$HOME", "`id`", "a\nb", "*", "", "-n",
         "back\\slash", "ü"]
# A shell that is not installed shows as a skip (-rs), not as a parameter gone missing.
SHELLS = [pytest.param(s, marks=pytest.mark.skipif(shutil.which(s) is None,
                                                   reason=f"{s} is not installed"))
          for s in ("dash", "bash", "busybox")]


@pytest.mark.parametrize("shell", SHELLS)
def test_payload_passes_argv_and_env_exactly(shell, tmp_path):
    printer = tmp_path / "show"
    printer.write_text("#!/usr/bin/env python3\nimport os, sys, json\n"
                       "print(json.dumps([sys.argv[1:], dict(os.environ)]))\n")
    printer.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "FOO": "it's $x", "LD_PRELOAD": "libfakeroot.so",
           "MULTI": "a\nb", "bad-name": "x"}
    spec = RunSpec(argv=(str(printer), *NASTY), cwd="/", env=tuple(env.items()))
    script = guestrun.payload_script(spec) + 'hsh_guest_env="HSHELPER_DISK_X=/dev/vda"\n' \
        "hsh_payload\n"
    argv = [shell, "sh", "-c", script] if shell == "busybox" else [shell, "-c", script]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    import json

    got_argv, got_env = json.loads(out)
    assert got_argv == NASTY
    assert got_env["FOO"] == "it's $x" and got_env["MULTI"] == "a\nb"
    assert "LD_PRELOAD" not in got_env and "bad-name" not in got_env
    assert got_env["HSHELPER_DISK_X"] == "/dev/vda"
    assert got_env["PATH"].split(":")[:2] == ["/usr/bin", "/bin"]
    assert "/usr/sbin" in got_env["PATH"].split(":")


@pytest.mark.parametrize("shell", SHELLS)
def test_run_script_defines_the_steps_in_order(shell):
    spec = RunSpec(argv=("true",), cwd="/x", env=())
    steps = [("one", "echo 1"), ("two", "echo 2; echo \"$hsh_step_name\"")]
    for given, want in ((steps, "1\n2\ntwo\n"), ([], "")):
        script = guestrun.run_script(spec, given).decode() + "hsh_setup\n"
        argv = [shell, "sh", "-c", script] if shell == "busybox" else [shell, "-c", script]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert out == want

"""``--report FILE.json``: a machine-readable account of one run for release pipelines.

The report holds the exit status (and whether the run was skipped), wall-clock and
per-stage timings, the accelerator and why, the kernel, what a reproducible image was
made from (seed, SOURCE_DATE_EPOCH, ROOT's sha256: ``reproducible``, null without a seed
or SOURCE_DATE_EPOCH), and every artifact with its size
and sha256: each writable ``--disk`` (by its final name when a recipe renamed
``FILE.part`` to ``FILE``) plus the files named by ``--artifact GLOB``
(repeatable, relative to the working directory). It is written after every run that
reached the VM stage, also when the command failed; a declared artifact that matches no
file fails an otherwise successful run (exit 125) after the report is written.

Config: ``report.file`` (``--report``; also ``HSHELPER_REPORT_FILE``) and
``report.artifacts`` (a list of globs, added to ``--artifact``).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hshelper import report
from hshelper.config import Key
from hshelper.errors import HshelperError
from hshelper.hookspecs import hookimpl
from hshelper.model import ImageResult


class _ToConfig(argparse.Action):
    """Turn ``--report FILE`` into ``--set report.file=FILE`` so the option layers like
    every other setting (command line over environment over files)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "set", None) or [])
        items.append(f"report.file={values}")
        namespace.set = items


@dataclass
class _Run:
    """What this process's run has shown so far (one command per process)."""

    file: Path | None = None
    cwd: str = ""
    patterns: list[str] = field(default_factory=list)
    started_wall: float = 0.0
    started: float = 0.0
    image: ImageResult | None = None


_run = _Run()


@hookimpl
def hshelper_config_keys():
    return [Key("report", "file", str, "", "write a JSON report of each run to this file"),
            Key("report", "artifacts", list, [],
                "globs (relative to the working directory) of files the report lists")]


@hookimpl
def hshelper_add_arguments(parser, command):
    if command == "run":
        parser.add_argument("--report", action=_ToConfig, metavar="FILE.json",
                            help="write status, timings, accelerator, kernel and artifacts "
                                 "(size, sha256) as JSON")
        parser.add_argument("--artifact", action="append", default=[], metavar="GLOB",
                            help="a file the run makes, listed in the report (repeatable)")


@hookimpl
def hshelper_configure(config):
    global _run
    name = config.get("report", "file")
    cwd = os.getcwd()
    _run = _Run(file=Path(cwd, name) if name else None, cwd=cwd,
                patterns=list(config.get("report", "artifacts")),
                started_wall=time.time(), started=time.monotonic())


@hookimpl
def hshelper_image_built(image):
    _run.image = image


@hookimpl
def hshelper_run_spec(args):
    _run.patterns += getattr(args, "artifact", None) or []


@hookimpl
def hshelper_after_run(spec, result):
    if _run.file is None:
        return
    found, missing = report.expand_patterns(_run.patterns, _run.cwd)
    if result.skipped:
        missing = []  # nothing ran, so nothing was expected
    data = report.build_report(
        spec, result, _run.image, _run.cwd, report.disk_artifacts(spec.disks) + found,
        missing, started=_run.started_wall, finished=time.time(),
        total_seconds=time.monotonic() - _run.started)
    try:
        report.write_json(_run.file, data)
    except OSError as exc:
        raise HshelperError(f"cannot write the report {_run.file}: {exc.strerror}") from exc
    if missing and result.status == 0:
        raise HshelperError(f"--artifact {missing[0]!r} matched no file after the run "
                            f"(report: {_run.file})")

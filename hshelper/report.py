"""The run report (``helper-run --report FILE.json``): what a release pipeline needs to
publish the result of one run without looking at hshelper's output.

Pure functions that turn a finished run into a JSON-ready dict, plus the file hashing
and the atomic write. The plugin ``report`` decides when; this module decides what.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hshelper.model import Disk, ImageResult, RunResult, RunSpec

SCHEMA = 1
CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """A file the run produced: a writable ``--disk`` or a path named by ``--artifact``."""

    path: Path
    kind: str  # "disk" or "file"
    format: str | None = None  # a disk's image format (raw, qcow2)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def disk_artifacts(disks: tuple[Disk, ...]) -> list[Artifact]:
    """The disks the command could write: a read-only disk is an input, not a result.

    A disk attached as ``FILE.part`` that the command renamed to ``FILE`` when it was
    complete (the image recipes do) is listed as ``FILE``; one that is gone (a failed
    recipe removes its ``.part``) is not listed."""
    found = []
    for disk in disks:
        path = disk.path
        if disk.readonly:
            continue
        if not path.exists() and path.name.endswith(".part"):
            path = path.with_name(path.name[:-len(".part")])
        if path.exists():
            found.append(Artifact(path, "disk", disk.format))
    return found


def expand_patterns(patterns: list[str], cwd: str) -> tuple[list[Artifact], list[str]]:
    """``--artifact`` patterns (globs, relative to cwd) -> (files found, patterns that
    matched no file). A release job must notice an artifact that was not made."""
    found: list[Artifact] = []
    missing: list[str] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else os.path.join(cwd, pattern)
        matches = sorted(p for p in glob.glob(full) if os.path.isfile(p))
        if not matches:
            missing.append(pattern)
        found += [Artifact(Path(p), "file") for p in matches]
    return found, missing


def describe(artifact: Artifact, cwd: str) -> dict:
    """One artifact's entry: path (relative to cwd when inside it), size, sha256."""
    path = artifact.path
    st = path.stat()
    shown = os.path.relpath(path, cwd) if path.is_relative_to(cwd) else str(path)
    return {"path": shown, "absolute_path": str(path), "kind": artifact.kind,
            "format": artifact.format, "size": st.st_size,
            "allocated": st.st_blocks * 512, "sha256": sha256_file(path)}


def unique(artifacts: list[Artifact]) -> list[Artifact]:
    """Drop repeats (a disk also named by --artifact), keeping the first."""
    seen: set[Path] = set()
    out = []
    for artifact in artifacts:
        key = artifact.path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(artifact)
    return out


def reproducibility(spec: RunSpec) -> dict | None:
    """What a verifier needs to rebuild a reproducible image: the seed its identifiers
    came from (and where from), ``SOURCE_DATE_EPOCH``, the epoch its times are, and the
    sha256 of ROOT. None when the run had neither a seed nor SOURCE_DATE_EPOCH."""
    env = dict(spec.env)
    sde = env.get("SOURCE_DATE_EPOCH")
    seed = spec.extra.get("repro_seed")
    if seed is None and not sde:
        return None
    epoch = spec.extra.get("repro_epoch")
    return {"seed": seed, "seed_from": spec.extra.get("repro_seed_from"),
            "source_date_epoch": int(sde) if sde and sde.isdigit() else sde,
            "epoch": int(epoch) if epoch else None,
            "root_sha256": spec.extra.get("repro_root_sha256") or None}


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def build_report(spec: RunSpec, result: RunResult, image: ImageResult | None, cwd: str,
                 artifacts: list[Artifact], missing: list[str], started: float,
                 finished: float, total_seconds: float) -> dict:
    """The report as a dict. ``cwd`` is the host's working directory (artifact paths are
    relative to it); ``started``/``finished`` are epoch seconds (wall clock);
    ``total_seconds`` is monotonic time from start-up to the end of the run."""
    return {
        "schema": SCHEMA,
        "command": list(spec.argv),
        "cwd": cwd,
        "status": result.status,
        "ok": result.status == 0 and not missing,
        "reason": result.reason,
        "skipped": result.skipped,
        "started": iso(started),
        "finished": iso(finished),
        "timings": {
            "total_seconds": round(total_seconds, 3),
            "image_seconds": round(image.seconds, 3) if image else None,
            "image_cached": image.cached if image else None,
            "vm_seconds": round(result.seconds, 3),
            "boot_seconds": (round(result.boot_seconds, 3)
                             if result.boot_seconds is not None else None),
            # "restored" (from a saved VM state), "saved" (booted, and saved one) or
            # "booted"; restore_seconds: until the restored guest ran again.
            "start": result.start,
            "restore_seconds": (round(result.restore_seconds, 3)
                                if result.restore_seconds is not None else None),
        },
        "accelerator": {"name": result.accel.name, "reason": result.accel.reason},
        "kernel": ({"version": image.kernel_version, "image": str(image.kernel)}
                   if image else None),
        "memory_mb": spec.memory_mb,
        "cpus": spec.cpus,
        "reproducible": reproducibility(spec),
        "artifacts": [describe(a, cwd) for a in unique(artifacts)],
        "missing_artifacts": missing,
    }


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a pipeline polling for the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)

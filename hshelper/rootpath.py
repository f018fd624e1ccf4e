"""Resolve paths inside a build root without escaping it.

A build root is a directory tree that stands for ``/`` of another system. Its absolute
symlinks (``/lib64 -> usr/lib64``, ``ld-linux.so -> /usr/lib/...``) must be followed
relative to the root, never to the host. :func:`resolve` does that and records every
symlink it passed, so the image builder can put the same links into the guest.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

# Deeper chains than this are loops or malice; the kernel itself stops at 40.
MAX_LINKS = 40


class RootPathError(OSError):
    """A path could not be resolved inside the root (loop, missing component)."""


@dataclass(frozen=True)
class Resolved:
    """Where a guest path really lives in the root.

    ``path``: the final guest path (no symlinks left), ``host``: that path on the host,
    ``links``: every symlink passed on the way, as (guest path, link target) pairs.
    """

    path: str
    host: Path
    links: tuple[tuple[str, str], ...]


def normalize(path: str) -> str:
    """Return ``path`` as a clean absolute guest path ("/a/b", never "a//b/")."""
    norm = posixpath.normpath("/" + path)
    # normpath keeps a leading "//" (POSIX allows it a meaning); we do not.
    return "/" + norm.lstrip("/")


def host_path(root: Path, guest: str) -> Path:
    """The host path of ``guest`` inside ``root``, without resolving anything."""
    return root / normalize(guest).lstrip("/")


def resolve(root: Path, guest: str, must_exist: bool = True) -> Resolved:
    """Follow ``guest`` inside ``root`` component by component, symlinks included.

    Raises :class:`RootPathError` on a symlink loop, and FileNotFoundError when
    ``must_exist`` and a component is missing.
    """
    pending = [c for c in normalize(guest).split("/") if c]
    done: list[str] = []
    links: list[tuple[str, str]] = []
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, part])
        hp = host_path(root, here)
        try:
            target = os.readlink(hp)
        except FileNotFoundError:
            if must_exist:
                raise
            done.append(part)
            continue
        except OSError:  # EINVAL: not a symlink
            done.append(part)
            continue
        if len(links) >= MAX_LINKS:
            raise RootPathError(f"too many levels of symbolic links at {here} in {root}")
        links.append((here, target))
        # "done" holds resolved real directories only, so a relative target continues
        # from it and ".." can simply pop; an absolute one starts again at the root.
        if target.startswith("/"):
            done = []
        pending = [c for c in target.split("/") if c and c != "."] + pending
    final = "/" + "/".join(done)
    return Resolved(final, host_path(root, final), tuple(links))

"""The image recipes shipped with hshelper (installed as ``hshelper.recipes``).

A recipe is a POSIX sh script here, run as root in the helper VM: ``helper-run
--recipe mkimage ARGS`` (plugin ``recipes``) or ``helper-run recipes/mkimage.sh ARGS``
from a source tree. ``hshelper recipes`` lists them. Files whose names start with ``_``
are helpers, not recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    name: str  # "mkimage" for mkimage.sh
    path: Path  # where it is installed (readable by the build user)
    summary: str  # the first comment line after the shebang


def summary_of(text: str) -> str:
    """The recipe's one-line summary: its first comment after the shebang, without
    the leading "name.sh: "."""
    for line in text.splitlines()[1:]:
        if line.startswith("#"):
            words = line.lstrip("# ").strip()
            return words.split(": ", 1)[1] if ": " in words else words
        if line.strip():
            break
    return ""


def directory() -> Path:
    # The package's own directory: installed as plain files (pyproject's package-data),
    # and importlib.resources cost 1 ms of every run's start.
    return Path(__file__).parent


def available() -> dict[str, Recipe]:
    """Every recipe, by name."""
    found = {}
    for path in sorted(directory().glob("*.sh")):
        if not path.name.startswith("_"):
            name = path.name[:-3]
            found[name] = Recipe(name, path, summary_of(path.read_text()))
    return found


def scripts() -> dict[str, str]:
    """Every shell file here (recipes and the helpers they source), by file name."""
    return {p.name: p.read_text() for p in sorted(directory().glob("*.sh"))}

"""``helper-run --recipe NAME ARGS``: run a recipe shipped with hshelper.

The recipes (``hshelper.recipes``: mkimage, mkimage-mbr, mkimage-loop) are POSIX sh
scripts installed with the package. With ``--recipe``, CMD is a recipe's name: the
recipe files travel in the run's own archive (they are small) to /hshelper/recipes in
the guest, so they are there without any share and without changing the cached image;
in ``--mode root`` the build root is the guest's /, and the installed files are used.
A recipe's ``--help`` (or ``-h``, anywhere before a ``--``) is answered on the host,
by the recipe itself run with ``sh RECIPE --help``: no image, no VM. No config keys.
"""

from __future__ import annotations

import dataclasses
import sys

from hshelper import recipes, runner
from hshelper.errors import HshelperError
from hshelper.guestrun import quote
from hshelper.hookspecs import hookimpl

GUEST_DIR = "/hshelper/recipes"
EOF_WORD = "HSHELPER_RECIPE_EOF"


def resolve(name: str) -> str:
    """The guest path of recipe ``name`` (a name only, never a path)."""
    found = recipes.available()
    if name not in found:
        raise HshelperError(f"--recipe: no recipe named {name!r} (there are: "
                            f"{', '.join(found) or 'none'}; hshelper recipes lists them)",
                            status=2)
    return f"{GUEST_DIR}/{name}.sh"


def install_code(scripts: dict[str, str], directory: str = quote(GUEST_DIR)) -> str:
    """Shell code that writes the scripts to ``directory`` (shell text, quoted by the
    caller) in quoted here-documents."""
    lines = [f"mkdir -p {directory}"]
    for file_name, text in scripts.items():
        if EOF_WORD in text:
            raise HshelperError(f"recipe {file_name} contains {EOF_WORD}, which ends the "
                                "here-document that carries it")
        target = f"{directory}/{quote(file_name)}"
        lines.append(f"cat >{target} <<'{EOF_WORD}'\n{text.rstrip()}\n{EOF_WORD}")
        lines.append(f"chmod 755 {target}")
    return "\n".join(lines)


@hookimpl
def hshelper_add_arguments(parser, command):
    if command == "run":
        parser.add_argument("--recipe", action="store_true",
                            help="CMD names a recipe shipped with hshelper (hshelper "
                                 "recipes lists them): helper-run --recipe mkimage --help")


def wants_help(argv: list[str]) -> bool:
    """Whether the recipe's arguments ask for its help (before a ``--`` that ends its
    options, as the recipes read them)."""
    for word in argv:
        if word == "--":
            return False
        if word in ("-h", "--help"):
            return True
    return False


@hookimpl
def hshelper_answer_on_host(args):
    if not getattr(args, "recipe", False):
        return None
    argv = list(getattr(args, "command", None) or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or not wants_help(argv[1:]):
        return None
    resolve(argv[0])  # a known recipe name, or a usage error
    path = str(recipes.available()[argv[0]].path)  # the installed file, readable here
    # The recipe's own --help, printed by the recipe: its text, exactly, at no VM's cost.
    sys.stdout.buffer.write(runner.run(["sh", path, "--help"]))
    return 0


@hookimpl
def hshelper_run_spec(spec, args):
    if not getattr(args, "recipe", False):
        return None
    path = resolve(spec.argv[0])
    return dataclasses.replace(spec, argv=(path, *spec.argv[1:]),
                               extra={**spec.extra, "recipe": spec.argv[0]})


@hookimpl
def hshelper_guest_setup(spec):
    if "recipe" not in spec.extra:
        return []
    # Into the command's root (the overlay's writable layer, or the image itself).
    return [("recipes", install_code(recipes.scripts(), f'"$hsh_newroot"{GUEST_DIR}'))]

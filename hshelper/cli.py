"""The command line: ``hshelper build|run|shell|info|plugins|config|clean`` and
``helper-run`` (the short form of ``hshelper run``).

The only module that turns errors into exit statuses and prints tracebacks (with
``--debug`` only): library code raises HshelperError with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import sys
import textwrap
from pathlib import Path

from hshelper import __version__, helptext, trace
from hshelper.config import Config, Layer, default_layer_paths, env_layer, read_toml_layer
from hshelper.core import COMPRESSIONS
from hshelper.errors import EXIT_FAILED, EXIT_USAGE, HshelperError
from hshelper.pluginhost import PluginHost
from hshelper.sysroot import Sysroot

COMMANDS = tuple(helptext.COMMANDS)
EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a writer whose reader left


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (they are wrapped by hand), "Usage:" as
    help2man looks for it, and at most 79 columns whatever the terminal (a manual page
    made from --help comes out the same on every build machine)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        width = min(width or shutil.get_terminal_size().columns - 2, 79)
        super().__init__(prog, indent_increment, max_help_position, width)

    def add_usage(self, usage, actions, groups, prefix=None):
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line and exit 2 like every other, and option
    names taken exactly."""

    def error(self, message):
        raise HshelperError(f"{message} (see {self.prog} --help)", status=EXIT_USAGE)

    def _get_option_tuples(self, option_string):
        # No abbreviations, not even of single-dash names: with vm-run's -cpu, -chardev
        # and -cdrom known, a command's own `sh -c` would be an ambiguous abbreviation
        # (argparse looks at the words after the command too). A short option's
        # clustering (-vq) and attached value (-pno:NAME) stay.
        return [t for t in super()._get_option_tuples(option_string) if len(t[1]) == 2]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sysroot", metavar="DIR", default="/",
                        help="the build root to take kernel and programs from (default: /)")
    parser.add_argument("--kernel", metavar="VERSION", help="kernel version (default: newest)")
    parser.add_argument("-p", dest="plugin_opts", action="append", default=[],
                        metavar="no:NAME", help="disable plugin NAME (repeatable)")
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="an extra config file, layered after ./hshelper.toml")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                        help="set a config key, in the same units as the options "
                             "(run.memory=1G); highest precedence")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more")
    parser.add_argument("--debug", action="store_true", help="log commands, show tracebacks")


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--with", dest="with_programs", action="append", default=[],
                        metavar="PROG", help="add a program of the build root to the image")
    parser.add_argument("--module", dest="with_modules", action="append", default=[],
                        metavar="NAME", help="add a kernel module to the image")
    parser.add_argument("--compression", choices=COMPRESSIONS,
                        help="initrd compression (default: auto, the fastest the kernel "
                             "unpacks)")


def _pre_scan(argv: list[str]) -> tuple[set[str], list[str]]:
    """Blocked plugin names and extra config files, known before any plugin loads."""
    blocked, files = set(), []
    for i, word in enumerate(argv):
        value = None
        if word == "-p" and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith("-p") and len(word) > 2:
            value = word[2:]
        if value and value.startswith("no:"):
            blocked.add(value[3:])
        if word == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif word.startswith("--config="):
            files.append(word.split("=", 1)[1])
        if word == "--":
            break
    return blocked, files


def _file_layers(extra: list[str]) -> tuple[list[Layer], list[tuple[Path, bool]]]:
    """The config files' layers, and every file looked for with whether it was read."""
    layers, looked = [], []
    for path in [*default_layer_paths(), *map(Path, extra)]:
        layer = read_toml_layer(path)
        if layer is None and str(path) in extra:
            raise HshelperError(f"--config {path}: no such file", status=EXIT_USAGE)
        looked.append((path, layer is not None))
        if layer is not None:
            layers.append(layer)
    return layers, looked


def _cli_layer(args: argparse.Namespace) -> Layer:
    values: dict = {}
    for item in args.set:
        dotted, sep, value = item.partition("=")
        if not sep or "." not in dotted:
            raise HshelperError(f"--set {item!r}: expected SECTION.KEY=VALUE",
                                status=EXIT_USAGE)
        values[dotted] = value
    if args.kernel:
        values["image.kernel"] = args.kernel
    for name in ("with_programs", "with_modules"):
        extra = getattr(args, name, None)
        if extra:
            key = "image.programs" if name == "with_programs" else "image.modules"
            values[key] = extra
    if getattr(args, "compression", None):
        values["image.compression"] = args.compression
    for attr, dotted in (("memory", "run.memory"), ("cpus", "run.cpus"),
                         ("timeout", "run.timeout"), ("mode", "run.mode"), ("qemu", "run.qemu")):
        if getattr(args, attr, None) is not None:
            values[dotted] = getattr(args, attr)
    return Layer("command line", values, usage=True)


def _check_common(args: argparse.Namespace) -> None:
    """What argparse cannot check by itself: a usage error, before anything runs."""
    for value in args.plugin_opts:
        if not value.startswith("no:") or value == "no:":
            raise HshelperError(f"-p {value}: expected no:NAME (disable plugin NAME)",
                                status=EXIT_USAGE)
    if not os.path.isdir(args.sysroot):
        raise HshelperError(f"--sysroot {args.sysroot}: not a directory", status=EXIT_USAGE)


class Session:
    """Plugins and config for one command invocation."""

    def __init__(self, argv: list[str], command: str):
        blocked, extra_files = _pre_scan(argv)
        layers, self.config_files = _file_layers(extra_files)
        from_cli = set(blocked)
        # [plugins] from the files decides what loads; validated with the rest below.
        for layer in layers:
            blocked |= set(layer.values.get("plugins.disable", []))
        # A plugin file named in a config file is relative to that file.
        local = [Path(layer.origin).parent / p if "/" in layer.origin else Path(p)
                 for layer in layers for p in layer.values.get("plugins.load", [])]
        self.host = PluginHost(blocked=blocked, files=local, usage_names=from_cli)
        self.keys = [k for keys in self.host.hook.hshelper_config_keys() for k in keys]
        self.file_layers = layers
        self.command = command

    def parser(self) -> argparse.ArgumentParser:
        command = "run" if self.command == "helper-run" else self.command
        prog = "helper-run" if self.command == "helper-run" else f"hshelper {command}"
        description = textwrap.fill(helptext.COMMANDS[command][1], 79)
        if self.command == "helper-run":
            details = helptext.COMMANDS["run"][1].split(". ", 1)[1]
            description = "\n\n".join(textwrap.fill(text, 79) for text in (
                helptext.HELPER_RUN_PURPOSE, details))
        parser = _Parser(
            prog=prog, formatter_class=_Formatter,
            usage="%(prog)s [OPTIONS] CMD [ARGS...]" if command == "run"
            else "%(prog)s [OPTIONS]",
            description=description,
            epilog=helptext.epilog(command),
            # vm-run's shell options are written +x, +e as well as -x, -e.
            prefix_chars="-+" if command == "run" else "-")
        parser.add_argument("--version", action="version",
                            version=f"helper-run (hshelper) {__version__}"
                            if self.command == "helper-run" else f"hshelper {__version__}")
        _common(parser)
        if self.command in ("build", "run", "helper-run", "shell", "info"):
            _image_options(parser)
        if command == "build":
            parser.add_argument("--output", metavar="DIR", help="also write kernel, initrd "
                                "and manifest into DIR")
            parser.add_argument("--json", action="store_true", help="report as JSON")
        if command in ("run", "shell"):
            from hshelper import runcmd

            runcmd.add_arguments(parser, command)
        self.host.hook.hshelper_add_arguments(parser=parser, command=command)
        return parser

    def configure(self, args: argparse.Namespace) -> Config:
        _check_common(args)
        layers = [*self.file_layers, env_layer(self.keys), _cli_layer(args)]
        config = Config(self.keys, layers)
        self.host.hook.hshelper_configure(config=config)
        return config


def _report_build(image, as_json: bool) -> None:
    if as_json:
        data = {"kernel_version": image.kernel_version, "kernel": str(image.kernel),
                "initrd": str(image.initrd), "manifest": str(image.manifest),
                "key": image.key, "cached": image.cached, "seconds": round(image.seconds, 4),
                "size": image.size, "compression": image.compression,
                "modules": list(image.modules), "files": image.files,
                "missing": list(image.missing), "features": sorted(image.features)}
        print(json.dumps(data, indent=1))
        return
    print(f"hshelper: kernel {image.kernel_version}, {len(image.modules)} modules, "
          f"{image.files} files, {image.size / 1e6:.1f} MB {image.compression}, "
          f"{image.seconds:.2f} s, cache {'hit' if image.cached else 'miss'}: {image.initrd}")


def cmd_build(session: Session, args, config) -> int:
    from hshelper import initrd

    image = initrd.build_image(session.host, Sysroot(args.sysroot), config)
    if args.output:
        initrd.write_output(image, Path(args.output))
    _report_build(image, args.json)
    if image.missing and args.verbose:
        for title, names in group_missing(image.missing):
            print(f"hshelper: {title}: " + ", ".join(names), file=sys.stderr)
    return 0


# How initrd.choose_programs names a program it left out for its weight.
OVER_BUDGET = re.compile(r"(?P<name>\S+) \((?P<size>[\d.]+ MB) with its libraries, over "
                         r"image\.program_budget_kb; --with (?P=name) adds it\)")


def group_missing(missing) -> list[tuple[str, list[str]]]:
    """What the image lacks, by why: a program the build root does not have, one left
    out because it weighs more than image.program_budget_kb (named with its size and
    the --with that adds it), an optional module the kernel does not have."""
    groups: dict[str, list[str]] = {}
    for item in missing:
        over = OVER_BUDGET.fullmatch(item)
        if item.startswith("module ") or item.startswith("all modules"):
            title = "modules the kernel does not have"
            item = item.removeprefix("module ")
        elif "program_budget_kb" in item:
            title = "left out of the image (over image.program_budget_kb)"
            if over:  # shorter, and without the ", " that separates the items
                item = f"{over['name']} ({over['size']}: --with {over['name']})"
        else:
            title = "not installed in the build root"
        groups.setdefault(title, []).append(item)
    order = ("left out of the image (over image.program_budget_kb)",
             "not installed in the build root", "modules the kernel does not have")
    return [(title, groups[title]) for title in order if title in groups]


def cmd_info(session: Session, args, config) -> int:
    from hshelper import initrd

    sysroot = Sysroot(args.sysroot)
    kernels = sysroot.kernels()
    print(f"build root: {sysroot.root}")
    for k in kernels:
        print(f"kernel: {k.version} image={k.image} modules={k.moddir} config={k.config}")
    if not kernels:
        print("kernel: none (" + sysroot.kernel_package_hint() + ")")
        return EXIT_FAILED
    plan = initrd.plan_image(session.host, sysroot, config)
    programs = sorted(e.path for e in plan.entries
                      if e.kind in ("file", "link")
                      and os.path.basename(os.path.dirname(e.path)) in ("bin", "sbin"))
    print(f"image: {len(plan.entries)} entries, {len(plan.modules)} modules, "
          f"compression {plan.compression}")
    print("programs: " + " ".join(os.path.basename(p) for p in programs))
    for title, names in group_missing(plan.missing):
        print(f"{title}: " + ", ".join(names))
    from hshelper import cache, runcmd

    runcmd.print_info(session, args, config, sysroot)
    root = cache.root(config)
    parts = cache.sizes(root)
    print(f"cache: {root}, {sum(parts.values()) / 1e6:.1f} MB ("
          + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in parts.items() if size)
          + ")")
    return 0


def cmd_plugins(session: Session, args, config) -> int:
    for info in session.host.info():
        print(f"{info.name:12} {info.origin}")
        print(f"{'':12} hooks: {', '.join(info.hooks) or '-'}")
    return 0


def cmd_config(session: Session, args, config) -> int:
    print("# config files, in the order read (later ones win):")
    for path, read in session.config_files:
        print(f"#   {path}: {'read' if read else 'not found'}")
    print("#   then HSHELPER_SECTION_KEY variables, then the command line")
    for dotted, value, origin in config.items():
        print(f"{dotted} = {json.dumps(value)}    # {origin}")
    return 0


def cmd_recipes(session: Session, args, config) -> int:
    from hshelper import recipes

    for recipe in recipes.available().values():
        print(f"{recipe.name:14} {recipe.path}")
        print(f"{'':14} {recipe.summary}")
    print("run one: helper-run --recipe NAME ARGS (helper-run --recipe NAME --help)")
    return 0


def cmd_clean(session: Session, args, config) -> int:
    from hshelper import cache

    root = cache.root(config)
    removed = cache.clean(root)
    print(f"hshelper: removed the cache in {root}" +
          (f" ({', '.join(removed)})" if removed else " (it was empty)"))
    return 0


def _run_command(command: str, argv: list[str]) -> int:
    try:
        session = Session(argv, command)
        parser = session.parser()
        args = parser.parse_args(argv)
        if args.debug:
            trace.enable()
        config = session.configure(args)
        if command in ("run", "helper-run"):
            answer = session.host.hook.hshelper_answer_on_host(args=args, config=config)
            if answer is not None:
                return answer
        if command in ("run", "helper-run", "shell"):
            from hshelper import runcmd

            return runcmd.main(session, args, config, shell=command == "shell")
        handler = {"build": cmd_build, "info": cmd_info, "plugins": cmd_plugins,
                   "config": cmd_config, "clean": cmd_clean,
                   "recipes": cmd_recipes}[command]
        return handler(session, args, config)
    except HshelperError as exc:
        print(f"hshelper: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if stdout_gone():
            return EXIT_PIPE
        raise
    except Exception as exc:  # a plugin's bug must not become a traceback for the user
        where = ""
        session_obj = locals().get("session")
        if session_obj is not None:
            name = session_obj.host.plugin_of(exc)
            where = f" in plugin {name}" if name else ""
        print(f"hshelper: internal error{where}: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        if "--debug" in argv:
            raise
        return EXIT_FAILED


def stdout_gone() -> bool:
    """Whether our stdout is a pipe whose reader has left (``| head -1`` after its
    line). Then nothing more can be said there; stdout is pointed at /dev/null so the
    interpreter's last flush does not complain about it either."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), 0)
        gone = any(event & select.POLLERR for _, event in poll.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return gone


def _quiet_on_closed_stdout(run) -> int:
    """Run ``run()``; a reader that left early ends the command with the status a
    shell reports for a writer killed by SIGPIPE, and no message."""
    try:
        try:
            status = run()
        except SystemExit as exc:  # argparse, after --help or --version
            status = exc.code
        sys.stdout.flush()  # here, where a closed pipe can still be told apart
        return status
    except BrokenPipeError:
        if stdout_gone():
            return EXIT_PIPE
        raise


def _main(argv: list[str]) -> int:
    if not argv:
        print(f"hshelper: no command given (one of {', '.join(COMMANDS)}; see hshelper "
              "--help)", file=sys.stderr)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help"):
        print(helptext.main_help())
        return 0
    if argv[0] == "--version":
        print(f"hshelper {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"hshelper: unknown command {argv[0]!r} (one of {', '.join(COMMANDS)}; "
              "see hshelper --help)", file=sys.stderr)
        return EXIT_USAGE
    return _run_command(argv[0], argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _quiet_on_closed_stdout(lambda: _main(argv))


def helper_run_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _quiet_on_closed_stdout(lambda: _run_command("helper-run", argv))

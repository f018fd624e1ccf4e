"""The command line: ``hshelper build|run|shell|info|plugins|config|clean`` and
``helper-run`` (the short form of ``hshelper run``).

The only module that turns errors into exit statuses and prints tracebacks (with
``--debug`` only): library code raises HshelperError with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hshelper import __version__
from hshelper.config import Config, Layer, default_layer_paths, env_layer, read_toml_layer
from hshelper.errors import EXIT_FAILED, HshelperError
from hshelper.pluginhost import PluginHost
from hshelper.sysroot import Sysroot

log = logging.getLogger("hshelper")
COMMANDS = ("build", "run", "shell", "info", "plugins", "config", "clean", "recipes")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sysroot", metavar="DIR", default="/",
                        help="the build root to take kernel and programs from (default: /)")
    parser.add_argument("--kernel", metavar="VERSION", help="kernel version (default: newest)")
    parser.add_argument("-p", dest="plugin_opts", action="append", default=[],
                        metavar="no:NAME", help="disable plugin NAME (repeatable)")
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="an extra config file, layered after ./hshelper.toml")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                        help="set a config key (highest precedence)")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more")
    parser.add_argument("--debug", action="store_true", help="log commands, show tracebacks")


def _image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--with", dest="with_programs", action="append", default=[],
                        metavar="PROG", help="add a program of the build root to the image")
    parser.add_argument("--module", dest="with_modules", action="append", default=[],
                        metavar="NAME", help="add a kernel module to the image")
    parser.add_argument("--compression", choices=("auto", "zstd", "gzip", "xz", "none"))


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


def _file_layers(extra: list[str]) -> list[Layer]:
    layers = []
    for path in [*default_layer_paths(), *map(Path, extra)]:
        layer = read_toml_layer(path)
        if layer is None and str(path) in extra:
            raise HshelperError(f"config file {path} does not exist")
        if layer is not None:
            layers.append(layer)
    return layers


def _cli_layer(args: argparse.Namespace) -> Layer:
    values: dict = {}
    for item in args.set:
        dotted, sep, value = item.partition("=")
        if not sep or "." not in dotted:
            raise HshelperError(f"--set {item!r}: expected SECTION.KEY=VALUE")
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
    return Layer("command line", values)


class Session:
    """Plugins and config for one command invocation."""

    def __init__(self, argv: list[str], command: str):
        blocked, extra_files = _pre_scan(argv)
        layers = _file_layers(extra_files)
        # [plugins] from the files decides what loads; validated with the rest below.
        for layer in layers:
            blocked |= set(layer.values.get("plugins.disable", []))
        # A plugin file named in a config file is relative to that file.
        local = [Path(layer.origin).parent / p if "/" in layer.origin else Path(p)
                 for layer in layers for p in layer.values.get("plugins.load", [])]
        self.host = PluginHost(blocked=blocked, files=local)
        self.keys = [k for keys in self.host.hook.hshelper_config_keys() for k in keys]
        self.file_layers = layers
        self.command = command

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog="helper-run" if self.command == "helper-run" else f"hshelper {self.command}")
        _common(parser)
        if self.command in ("build", "run", "helper-run", "shell", "info"):
            _image_options(parser)
        command = "run" if self.command == "helper-run" else self.command
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
        print("hshelper: left out of the image: " + ", ".join(image.missing),
              file=sys.stderr)
    return 0


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
    if plan.missing:
        print("left out of the image: " + ", ".join(plan.missing))
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
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                            format="%(message)s")
        config = session.configure(args)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: hshelper {{{','.join(COMMANDS)}}} [options]\n\n"
              "  build    assemble (or find in the cache) the helper kernel and initrd\n"
              "  run      run a command as root in the helper VM (also: helper-run)\n"
              "  shell    an interactive root shell in the helper VM\n"
              "  info     what was found: kernel, modules, accelerator, qemu, programs\n"
              "  plugins  the loaded plugins, where they came from, their hooks\n"
              "  config   the effective configuration and where each value came from\n"
              "  clean    remove the image cache\n"
              "  recipes  the image recipes shipped with hshelper and where they are")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"hshelper {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"hshelper: unknown command {argv[0]!r} (one of {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    return _run_command(argv[0], argv[1:])


def helper_run_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _run_command("helper-run", argv)

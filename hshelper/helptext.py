"""The words of ``--help``: what each command is for, examples, exit statuses, files.

Written for people first and for help2man second: a purpose line, then sections whose
headings are unindented lines ending in a colon (help2man turns "Examples:", "Exit
status:", "Files:" and "Environment:" into man-page sections), their lines indented.
"""

from __future__ import annotations

import textwrap

PURPOSE = ("Run root-only build steps (partitioning, mkfs, loop devices, mounting) in a "
           "throwaway helper VM booted from the build root's own kernel and programs, "
           "from an unprivileged build root.")

HELPER_RUN_PURPOSE = ("Run CMD as root in a throwaway helper VM booted from the build "
                      "root's own kernel and programs, so that root-only build steps "
                      "(partitioning, mkfs, loop devices, mounting) work from an "
                      "unprivileged build root.")

# name -> (one line for the command list, the description of its --help)
COMMANDS = {
    "build": ("assemble (or find in the cache) the helper kernel and initrd",
              "Assemble the helper kernel and initrd from the build root, or find them in "
              "the cache, and say what went in. The same image serves every run until the "
              "build root, the configuration or hshelper changes."),
    "run": ("run a command as root in the helper VM (also: helper-run)",
            "Run CMD as root in a throwaway helper VM booted from the build root's own "
            "kernel and programs. The working directory is shared, and files written "
            "there belong to the build user. Output streams back with stdout and stderr "
            "apart, and the "
            "exit status comes back exactly. A single argument with shell syntax is "
            "command text: it runs with sh under vm-run's shell options (-ex unless "
            "changed), so the first failing command stops it and each command is traced "
            "to stderr."),
    "shell": ("an interactive root shell in the helper VM",
              "An interactive root shell in the helper VM, with the same shares and disks "
              "as run, for debugging a recipe. It reads the terminal line by line; exit or "
              "Ctrl-D ends it with the shell's status, Ctrl-C stops the VM."),
    "info": ("what was found: kernel, modules, accelerator, qemu, programs",
             "What hshelper finds in the build root: the kernels, the image's modules and "
             "programs, the programs left out of the image (not installed, or over the "
             "program budget, with the --with that adds them), qemu, and the accelerator "
             "with the reason for it."),
    "plugins": ("the loaded plugins, where they came from, their hooks",
                "The loaded plugins (built-in, installed entry points, local files), where "
                "each came from and the hooks it implements."),
    "config": ("the effective configuration and where each value came from",
               "The effective configuration: the config files looked for and read, in "
               "order, then every key with its value and the layer it came from."),
    "clean": ("remove the image cache",
              "Remove hshelper's image cache (built images, unpacked kernels, the KVM "
              "probe's answer)."),
    "recipes": ("the image recipes shipped with hshelper and where they are",
                "The image recipes shipped with hshelper, where they are installed and "
                "what each makes. Run one with helper-run --recipe NAME ARGS."),
}

EXAMPLES = {
    "run": [
        ("helper-run --disk out.img,size=1G,name=out 'mkfs.ext4 -q $HSHELPER_DISK_OUT'",
         "format a new 1 GiB image as ext4"),
        ("helper-run --recipe mkimage --size 2G root.tar disk.img",
         "a bootable GPT disk image from a root tarball"),
        ("helper-run --mode root 'make check'",
         "the build root's own tools, as root; the first failure stops it"),
        ("helper-run --kvm=cond --mem=1G ./tests.sh",
         "vm-run's options: skip (exit 0) without a working KVM"),
    ],
    "build": [("hshelper build --json", "the image's kernel, initrd and contents as JSON"),
              ("hshelper build --with sgdisk -v", "add a program; name what is left out")],
    "info": [("hshelper info", "what a run would use, and why")],
    "config": [("hshelper config --set run.memory=1G", "see a value and its origin")],
    "shell": [("hshelper shell --disk out.img", "poke at an image as root")],
    "recipes": [("helper-run --recipe mkimage --help", "a recipe's own help (no VM)")],
}

EXIT_STATUS = (
    ("0-255", "run, shell: the command's own exit status"),
    ("0", "other commands: done"),
    ("2", "usage error: an unknown option, a bad value, a file named on the command line "
          "that does not exist"),
    ("124", "the command timed out (--timeout)"),
    ("125", "hshelper or the VM failed; a one-line reason on stderr (and the kernel log's "
            "path); also a bad config file or HSHELPER_* variable"),
    ("126", "the command is not executable"),
    ("127", "the command was not found (the message says how to add it)"),
    ("130", "interrupted by SIGINT (Ctrl-C)"),
    ("141", "stdout was closed early (a pipe reader such as head exited)"),
    ("143", "stopped by SIGTERM"),
)

FILES = (
    ("/etc/hshelper/config.toml", "the system's configuration"),
    ("$XDG_CONFIG_HOME/hshelper/config.toml",
     "the user's (without XDG_CONFIG_HOME: ~/.config/hshelper/config.toml)"),
    ("./hshelper.toml", "the working directory's"),
    ("$XDG_CACHE_HOME/hshelper", "the image cache (else ~/.cache/hshelper, else "
                                 "/var/tmp/hshelper-cache-UID); [image] cache_dir moves it"),
)
FILES_NOTE = ("The config files are read in this order, later ones winning, then each "
              "--config FILE, then HSHELPER_SECTION_KEY variables, then the options and "
              "--set. hshelper config shows the files read and where each value came from.")

ENVIRONMENT = (
    ("HSHELPER_SECTION_KEY", "any config key (HSHELPER_RUN_MEMORY=1G, HSHELPER_RUN_MODE=root)"),
    ("XDG_CONFIG_HOME, XDG_CACHE_HOME", "where the user's config file and the cache are"),
)


def _table(rows, column: int) -> str:
    """Two columns, the right one starting at ``column`` and wrapped at 79; a left
    entry too long for its column puts the right one on the next line."""
    lines = []
    for left, right in rows:
        head = f"  {left}"
        if len(head) + 2 > column:
            lines.append(head)
            head = ""
        lines.append(textwrap.fill(right, 79, initial_indent=head.ljust(column),
                                   subsequent_indent=" " * column))
    return "\n".join(lines)


def _wrap(text: str, indent: str = "  ", width: int = 79) -> str:
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent)


def epilog(command: str) -> str:
    """The sections after a command's options: examples, exit status, files."""
    # Exit status first: help2man keeps it in DESCRIPTION, and starts EXAMPLES, FILES
    # and ENVIRONMENT sections at their headings.
    parts = ["Exit status:\n" + _table(EXIT_STATUS, 10)]
    examples = EXAMPLES.get(command)
    if examples:
        parts.append("Examples:\n" + "\n\n".join(f"  {line}\n      {what}"
                                                 for line, what in examples))
    parts.append("Files:\n" + _table(FILES, 30) + "\n" + _wrap(FILES_NOTE))
    parts.append("Environment:\n" + _table(ENVIRONMENT, 24))
    return "\n\n".join(parts)


def main_help() -> str:
    """``hshelper --help``."""
    width = max(map(len, COMMANDS)) + 2
    commands = "\n".join(f"  {name:{width}}{line}" for name, (line, _) in COMMANDS.items())
    examples = [*EXAMPLES["run"][:2], *EXAMPLES["build"][:1], *EXAMPLES["info"]]
    return (
        "Usage: hshelper COMMAND [OPTIONS]\n"
        "  or:  hshelper --help | --version\n\n"
        f"{textwrap.fill(PURPOSE, 79)}\n\n"
        f"Commands:\n{commands}\n\n"
        "Each command has its own --help; helper-run is short for hshelper run.\n\n"
        "Options:\n"
        "  -h, --help     show this help and exit\n"
        "  --version      show hshelper's version and exit\n\n"
        + epilog("") + "\n\nExamples:\n"
        + "\n\n".join(f"  {line}\n      {what}" for line, what in examples)
    )

"""An example local plugin (docs/plugins.md walks through it).

Named in a recipe's hshelper.toml:

    [plugins]
    load = ["stamp.py"]

it adds a guest setup step that runs as root in the VM before the command, and a note
in the image telling where the image came from.
"""

from hshelper.hookspecs import hookimpl
from hshelper.model import Contents, File


@hookimpl
def hshelper_image_contents():
    # Part of the image (and of its cache key): fixed content only.
    return Contents(files=(File("/etc/hshelper-example", data=b"built with stamp.py\n"),))


@hookimpl
def hshelper_guest_setup(spec):
    # Per run: shell code run by the guest init after the shares are mounted. The init
    # sees the command's root under $hsh_newroot (empty when the run has the image only).
    return [("stamp", "echo \"prepared for: $hsh_cmd\" > \"$hsh_newroot/run/stamp\"")]

"""``--debug``: each program hshelper starts, as it starts it, on stderr.

The logging module is imported only when the trace is on: at import it cost 5 ms of
every run, and a restored run takes half a second in all.
"""

from __future__ import annotations

import shlex

_on = False


def enable() -> None:
    global _on
    import logging

    logging.basicConfig(level=logging.DEBUG, format="%(message)s")
    _on = True


def command(argv: list[str], note: str = "") -> None:
    """Trace one program start (``note``: what it is given, e.g. its input's size)."""
    if _on:
        import logging

        logging.getLogger("hshelper").debug("+ %s%s", shlex.join(argv), note)

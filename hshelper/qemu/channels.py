"""The host ends of a VM's channels, and the loop that serves them.

Every channel is a socketpair: qemu inherits one end (``-chardev socket,fd=N``), we keep
the other, so nothing is ever created on disk and nothing is left behind. The loop is a
plain selector with one handler per channel (a table, not a chain of ifs), an outgoing
buffer per channel for what we send, and a tick between reads for deadlines.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

Handler = Callable[[bytes], None]  # called with b"" once, at end of file


@dataclass
class Channels:
    """Named socketpairs: ``fds()`` for qemu's command line, ``ours[name]`` for us."""

    names: tuple[str, ...]
    ours: dict[str, socket.socket] = field(default_factory=dict)
    theirs: dict[str, socket.socket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.names:
            self.ours[name], self.theirs[name] = socket.socketpair()

    def fds(self) -> dict[str, int]:
        return {name: sock.fileno() for name, sock in self.theirs.items()}

    def handed_over(self) -> None:
        """qemu has its ends now: close ours of them (EOF then means qemu is gone)."""
        for sock in self.theirs.values():
            sock.close()
        self.theirs.clear()

    def close(self) -> None:
        for sock in (*self.ours.values(), *self.theirs.values()):
            with contextlib.suppress(OSError):
                sock.close()


class Loop:
    """Read every registered source until each has reached its end of file."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.handlers: dict[int, Handler] = {}
        self.outgoing: dict[int, bytearray] = {}
        self.sources: dict[int, object] = {}

    def add(self, source, handler: Handler) -> None:
        """``source`` is a socket or a file with a fileno (qemu's stderr pipe)."""
        fd = source.fileno()
        os.set_blocking(fd, False)
        self.sources[fd] = source
        self.handlers[fd] = handler
        self.selector.register(fd, selectors.EVENT_READ)

    def send(self, source, data: bytes) -> None:
        """Queue ``data`` for ``source``; written as the other side takes it."""
        fd = source.fileno()
        self.outgoing.setdefault(fd, bytearray()).extend(data)
        self._events(fd)

    def _events(self, fd: int) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outgoing.get(fd) else 0)
        with contextlib.suppress(KeyError):
            self.selector.modify(fd, mask)

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(fd)
            self.outgoing.pop(fd, None)
        self.handlers[fd](data)

    def _write(self, fd: int) -> None:
        pending = self.outgoing.get(fd)
        if not pending:
            return
        try:
            written = os.write(fd, pending)
        except BlockingIOError:
            return
        except OSError:
            pending.clear()
        else:
            del pending[:written]
        self._events(fd)

    def open_count(self) -> int:
        return len(self.selector.get_map())

    def step(self, timeout: float) -> None:
        """Serve what is ready within ``timeout`` seconds."""
        for key, mask in self.selector.select(max(0.0, timeout)):
            if mask & selectors.EVENT_WRITE:
                self._write(key.fd)
            if mask & selectors.EVENT_READ and key.fd in self.selector.get_map():
                self._read(key.fd)

    def close(self) -> None:
        self.selector.close()

"""A small QMP client (qemu's JSON control protocol) on an inherited socket.

No thread of its own: whoever owns the socket feeds it what arrives (:meth:`QMP.feed`),
which answers qemu's greeting, collects events and the answers to commands sent. A
command can also be run synchronously (:meth:`QMP.execute`), which reads the socket
until its answer arrives and keeps the events that came in between.

The protocol: qemu greets with ``{"QMP": ...}``; the client must send
``qmp_capabilities`` before anything else (events flow only after it); every command is
``{"execute": NAME, "arguments": {...}, "id": N}`` answered by ``{"return": ...}`` or
``{"error": {"class", "desc"}}`` with the same id; events are ``{"event": NAME,
"data": {...}, "timestamp": ...}`` at any time.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hshelper.errors import HshelperError

Event = dict


class QMPError(HshelperError):
    """qemu refused a command: QMP's error class and description."""


@dataclass
class QMP:
    sock: socket.socket
    on_event: Callable[[Event], None] | None = None
    events: list[Event] = field(default_factory=list)
    greeted: bool = False
    _buffer: bytes = b""
    _next_id: int = 0
    _answers: dict[int, dict] = field(default_factory=dict)

    def feed(self, data: bytes) -> None:
        """Take bytes read from the socket; handle every complete message in them."""
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._handle(json.loads(line))

    def _handle(self, message: dict) -> None:
        if "QMP" in message:
            self.greeted = True
            self.send("qmp_capabilities")
        elif "event" in message:
            self.events.append(message)
            if self.on_event is not None:
                self.on_event(message)
        elif "id" in message:
            self._answers[message["id"]] = message

    def send(self, command: str, **arguments) -> int:
        """Send a command without waiting; returns its id."""
        self._next_id += 1
        message: dict = {"execute": command, "id": self._next_id}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        return self._next_id

    def answer(self, ident: int) -> dict | None:
        """The answer to command ``ident`` if it has come; raises QMPError on an error."""
        message = self._answers.pop(ident, None)
        if message is not None and "error" in message:
            err = message["error"]
            raise QMPError(f"qemu refused a command: {err.get('class')}: {err.get('desc')}")
        return message

    def pump(self, timeout: float) -> bool:
        """Read what the socket has within ``timeout``; False once it is closed."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return True
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.feed(data)
        return True

    def execute(self, command: str, timeout: float = 10.0, **arguments):
        """Run a command and return its ``return`` value (reads the socket itself)."""
        deadline = time.monotonic() + timeout
        while not self.greeted:
            if not self.pump(deadline - time.monotonic()) or time.monotonic() >= deadline:
                raise HshelperError(f"qemu's control channel did not greet (for {command})")
        ident = self.send(command, **arguments)
        while True:
            message = self.answer(ident)
            if message is not None:
                return message.get("return")
            # The deadline is checked before a read, so an answer in the last read counts.
            if time.monotonic() >= deadline:
                raise HshelperError(f"qemu did not answer {command} within {timeout:g} s")
            if not self.pump(deadline - time.monotonic()):
                raise HshelperError(f"qemu closed its control channel during {command}")

    def wait_event(self, name: str, timeout: float, since: int | None = None) -> bool:
        """Read the socket until event ``name`` arrives (True), or until ``timeout`` or
        the socket's end (False). The events counted are those from index ``since`` of
        :attr:`events` on; by default only those that arrive during the wait. An event
        read together with a command's answer is already in :attr:`events` when
        :meth:`execute` returns: a caller that must not miss it passes ``since``."""
        deadline = time.monotonic() + timeout
        seen = len(self.events) if since is None else since
        while True:
            if any(e.get("event") == name for e in self.events[seen:]):
                return True
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not self.pump(left):
                    return False
            except ConnectionError:  # qemu went away without closing cleanly
                return False

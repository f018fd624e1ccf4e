"""The QMP client against a stand-in qemu on a socketpair that speaks QMP's wire format
(greeting, capabilities negotiation, ids, errors, events in between)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from hshelper.qemu.qmp import QMP, QMPError


def fake_qemu(sock: socket.socket, script: list) -> threading.Thread:
    """Greet, then answer each command in turn: ``script`` items are (expected command,
    events to send first, reply) with reply a ``return`` value or an ``error`` dict."""
    def serve():
        reader = sock.makefile("rb")
        sock.sendall(b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}\n')
        for expected, events, reply in script:
            msg = json.loads(reader.readline())
            assert msg["execute"] == expected, msg
            for event in events:
                sock.sendall(json.dumps(event).encode() + b"\r\n")
            answer = {"error": reply} if isinstance(reply, dict) and "class" in reply \
                else {"return": reply}
            answer["id"] = msg["id"]
            sock.sendall(json.dumps(answer).encode() + b"\r\n")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_negotiates_then_executes_and_keeps_events():
    ours, theirs = socket.socketpair()
    stop = {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}
    fake_qemu(theirs, [("qmp_capabilities", [], {}),
                       ("query-status", [stop], {"running": False, "status": "paused"})])
    seen = []
    qmp = QMP(ours, on_event=seen.append)
    assert qmp.execute("query-status", timeout=5) == {"running": False, "status": "paused"}
    assert seen == [stop] and qmp.events == [stop]


def test_an_error_answer_raises_with_class_and_description():
    ours, theirs = socket.socketpair()
    fake_qemu(theirs, [("qmp_capabilities", [], {}),
                       ("nonsense", [], {"class": "CommandNotFound",
                                         "desc": "The command nonsense has not been found"})])
    with pytest.raises(QMPError, match="CommandNotFound: The command nonsense"):
        QMP(ours).execute("nonsense", timeout=5)


def test_feed_handles_split_and_joined_messages():
    ours, theirs = socket.socketpair()
    qmp = QMP(ours)
    qmp.feed(b'{"QMP": {}}\n{"event": "RES')
    assert qmp.greeted and qmp.events == []
    qmp.feed(b'UME", "data": {}}\n{"event": "STOP"}\n')
    assert [e["event"] for e in qmp.events] == ["RESUME", "STOP"]
    sent = json.loads(theirs.recv(4096))
    assert sent["execute"] == "qmp_capabilities"


def test_a_silent_peer_times_out():
    ours, theirs = socket.socketpair()
    with pytest.raises(Exception, match="did not greet"):
        QMP(ours).execute("query-status", timeout=0.3)


def real_qemu(sock: socket.socket) -> subprocess.Popen:
    """A real qemu, stopped (-S), with its QMP monitor on ``sock``."""
    return subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "none", "-S",
         "-chardev", f"socket,id=q,fd={sock.fileno()}", "-mon", "chardev=q,mode=control"],
        pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL)


def test_wait_event_returns_when_a_real_qemu_sends_it_and_false_when_it_never_comes():
    ours, theirs = socket.socketpair()
    proc = real_qemu(theirs)
    theirs.close()
    try:
        qmp = QMP(ours)
        assert qmp.execute("query-status", timeout=10)["status"] == "prelaunch"
        # Nothing resumes a stopped VM by itself: the wait ends at its timeout.
        assert not qmp.wait_event("RESUME", timeout=0.3)
        qmp.send("cont")
        assert qmp.wait_event("RESUME", timeout=10)
        # An event that came before the wait does not count for it.
        assert not qmp.wait_event("RESUME", timeout=0.3)
        qmp.send("quit")
        # The end of the socket ends the wait (False) long before its timeout.
        started = time.monotonic()
        assert not qmp.wait_event("NEVER", timeout=30)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()


def test_an_event_read_with_an_answer_counts_for_a_wait_since_before_it():
    """qemu answers, then sends the event; read late, both come in one chunk. A wait
    that starts after execute() misses it unless it counts from before."""
    ours, theirs = socket.socketpair()

    def serve():
        reader = theirs.makefile("rb")
        theirs.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        json.loads(reader.readline())  # qmp_capabilities
        theirs.sendall(b'{"return": {}, "id": 1}\n')
        msg = json.loads(reader.readline())
        theirs.sendall(json.dumps({"return": {"status": "inmigrate"}, "id": msg["id"]})
                       .encode() + b'\n{"event": "RESUME", "data": {}}\n')
    threading.Thread(target=serve, daemon=True).start()
    qmp = QMP(ours)
    mark = len(qmp.events)
    time.sleep(0.3)  # the reply and the event are both in the socket now
    assert qmp.execute("query-status", timeout=5) == {"status": "inmigrate"}
    assert not qmp.wait_event("RESUME", timeout=0.3)
    assert qmp.wait_event("RESUME", timeout=0.3, since=mark)


def test_an_answer_in_the_read_that_ends_at_the_deadline_counts():
    ours, theirs = socket.socketpair()
    qmp = QMP(ours, greeted=True)
    real_pump = qmp.pump

    def slow_pump(timeout):  # the answer comes in, but the read took past the deadline
        theirs.sendall(b'{"return": {"status": "running"}, "id": 1}\n')
        time.sleep(timeout + 0.1)
        return real_pump(0)
    qmp.pump = slow_pump
    assert qmp.execute("query-status", timeout=0.2) == {"status": "running"}

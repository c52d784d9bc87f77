"""The order of a run's log lines while its VMs' phases overlap (``backup._LogOrder``)."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from ovirt_borg import backup, logs


@pytest.fixture
def stream():
    """The root logger writing --log-json lines into a buffer for the test."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.setup(0, log_json=True, stream=out)
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(out: io.StringIO) -> list[tuple[str | None, str]]:
    return [(doc.get("vm"), doc["message"]) for doc in map(json.loads, out.getvalue().splitlines())]


def slot(index: int, name: str) -> backup._Slot:
    return backup._Slot(index, backup.VmInfo(id=f"id-{name}", name=name, status="up"))


def test_lines_of_later_vms_wait_for_the_ones_before(stream):
    log = logging.getLogger("ovirt_borg.test")
    order = backup._LogOrder()
    a, b, c = slot(0, "a"), slot(1, "b"), slot(2, "c")
    with order.installed():
        with a.context():
            log.info("a streams")

        def prepare(s: backup._Slot) -> None:
            with s.context():
                log.info("%s prepared", s.vm.name)

        for s in (c, b):  # out of order, from other threads
            thread = threading.Thread(target=prepare, args=(s,))
            thread.start()
            thread.join()
        log.info("about no VM")
        with a.context():
            log.info("a finished")
        assert lines(stream) == [("a", "a streams"), (None, "about no VM"), ("a", "a finished")]
        order.done(0)
        with b.context():
            log.info("b streams")
        assert lines(stream)[3:] == [("b", "b prepared"), ("b", "b streams")]
        with a.context():
            log.info("a, late")
    # the end of the run gives out what is still held, in the VMs' order
    assert lines(stream)[5:] == [("a", "a, late"), ("c", "c prepared")]
    assert all(not isinstance(f, backup._Gate) for h in logging.getLogger().handlers for f in h.filters)

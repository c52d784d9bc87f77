"""Logging set-up: plain lines (journald adds the time), or JSON lines with --log-json.

Every record passes a filter that masks secrets registered with ``add_secret`` (the engine
password, the Borg passphrase) and imageio ticket ids in URLs, so that neither reaches a log.

Under systemd, when standard error is the journal's stream (``JOURNAL_STREAM`` names its device
and inode), every line starts with its syslog priority (``<3>`` for errors ... ``<7>`` for
debug), which journald takes off and records, so ``journalctl -p err`` finds the errors.
``--log-json`` lines have the shape of Borg's own (``type``, ``time``, ``levelname``, ``name``,
``message``), with ``vm`` and ``archive`` where a VM's backup is under way (``context``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator

_TICKET_URL = re.compile(r"(/images/)[A-Za-z0-9-]{8,}")
_secrets: set[str] = set()


def add_secret(secret: str) -> None:
    """Mask ``secret`` in every log record from now on."""
    if secret and len(secret) >= 3:
        _secrets.add(secret)


def mask(text: str) -> str:
    """Return ``text`` with secrets and imageio ticket ids replaced by ****."""
    text = _TICKET_URL.sub(r"\1****", text)
    for secret in _secrets:
        text = text.replace(secret, "****")
    return text


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        record.msg, record.args = masked, None
        return True


#: What a log line is about (``vm``, ``archive``), for --log-json; set with ``context``.
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "ovirt_borg_log_context", default={})  # noqa: B039 (never mutated: each change sets a new dict)


@contextlib.contextmanager
def context(**fields: str) -> Iterator[None]:
    """Within the block, --log-json lines carry ``fields`` (e.g. ``vm=NAME``) besides earlier ones.

    Threads started inside the block do not inherit it (contextvars); their lines name the
    VM in their text as before.
    """
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def set_context(**fields: str) -> None:
    """Add ``fields`` to the innermost ``context`` block (e.g. the archive once it is named)."""
    _context.set({**_context.get(), **fields})


class JsonFormatter(logging.Formatter):
    """Borg's ``--log-json`` line shape (``borg.logger.JsonFormatter``): type, time (epoch
    seconds), levelname, name, message; plus ``vm``/``archive`` and ``exception`` when set."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"type": "log_message", "time": record.created, "levelname": record.levelname,
               "name": record.name, "message": record.getMessage(), **_context.get()}
        if record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc)


#: syslog priorities (RFC 5424) of the logging levels, for journald's ``<N>`` line prefix.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    return next((priority for level, priority in _PRIORITIES if levelno >= level), 7)


class JournalFormatter(logging.Formatter):
    """Plain lines, each (a traceback's too) prefixed with its syslog priority for journald."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def is_journal(stream) -> bool:
    """Whether ``stream`` is the journal's stream socket that systemd gave this process.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of the socket it connects to standard
    output/error (systemd.exec(5)); a stream redirected elsewhere does not match.
    """
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def setup(verbose: int = 0, log_json: bool = False, stream=None) -> None:
    """Configure the root logger once: level from -v, plain or JSON lines, secret masking."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(MaskingFilter())
    if log_json:
        handler.setFormatter(JsonFormatter())
    elif is_journal(handler.stream):
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    elif handler.stream.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # -v: ovirt-borg's own debug output; -vv: every library's as well.
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    logging.getLogger("ovirt_borg").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # The libraries below are chatty at INFO/DEBUG and may print URLs.
    for name in ("urllib3", "borg"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)

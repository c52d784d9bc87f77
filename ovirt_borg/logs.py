"""Logging set-up: plain lines (journald adds the time), or JSON lines with --log-json.

Every record passes a filter that masks secrets registered with ``add_secret`` (the engine
password, the Borg passphrase) and imageio ticket ids in URLs, so that neither reaches a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc)


def setup(verbose: int = 0, log_json: bool = False, stream=None) -> None:
    """Configure the root logger once: level from -v, plain or JSON lines, secret masking."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(MaskingFilter())
    if log_json:
        handler.setFormatter(JsonFormatter())
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

"""A notification at the end of a backup run: a JSON POST to any webhook, or an ntfy message.

Enabled by a ``[hooks.webhook]`` section::

    [hooks.webhook]
    url = "https://hooks.example.com/ovirt-borg"
    when = "failure"      # or "always"
    format = "json"       # or "ntfy"
    timeout = 10
    token_file = "/etc/ovirt-borg/webhook-token"   # optional: Authorization: Bearer <token>
    headers = { "X-Team" = "infra" }               # optional extra headers

``when = "failure"`` (the default) sends only when the run did not end with exit code 0
(a failed VM, or a warning such as a vetoed VM); ``"always"`` after every backup run.

``format = "json"`` POSTs ``application/json``::

    {"source": "ovirt-borg", "job": "nightly", "host": "backup1", "command": "backup",
     "status": "failure", "exit_code": 4,
     "vms": [{"vm": "web1", "ok": false, "exit_code": 4, "error": "...", "mode": "",
              "archive": "...", "seconds": 0.4, "bytes_read": 0}]}

``status`` is ``success`` (exit 0), ``warning`` (exit 1) or ``failure``.

``format = "ntfy"`` POSTs to an ntfy topic URL (``https://ntfy.sh/<topic>``) a plain-text
message with the ``Title``, ``Priority`` (``priority`` on failure, default ``high``; ``default``
on success) and ``Tags`` headers.

A notification that cannot be sent is logged as a warning and never fails the backup. The
URL's path and query, the token and header values are secrets: they are never logged.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import requests

from ovirt_borg import logs
from ovirt_borg.plugins import REQUIRED, hookimpl, plugin_options, secret_url

log = logging.getLogger(__name__)

OPTIONS = {
    "url": (str, REQUIRED),
    "when": (str, "failure"),
    "format": (str, "json"),
    "timeout": (float, 10.0),
    "token_file": (str, ""),
    "headers": (dict, {}),
    "title": (str, "ovirt-borg backup"),
    "priority": (str, "high"),
}
WHEN = ("failure", "always")
FORMATS = ("json", "ntfy")
NTFY_PRIORITIES = ("min", "low", "default", "high", "urgent", "1", "2", "3", "4", "5")

_settings: dict[str, Any] | None = None
_headers: dict[str, str] = {}
_display_url = ""


def configure(options: dict[str, Any]) -> None:
    """Take the ``[hooks.webhook]`` options; raises ValueError for a bad or missing one
    (an unreadable or empty ``token_file`` included)."""
    global _settings, _headers, _display_url
    settings = plugin_options(options, OPTIONS)
    for name, allowed in (("when", WHEN), ("format", FORMATS), ("priority", NTFY_PRIORITIES)):
        if settings[name] not in allowed:
            raise ValueError(f"option {name!r} must be one of {', '.join(allowed)}, got {settings[name]!r}")
    if settings["timeout"] <= 0:
        raise ValueError(f"option 'timeout' must be positive, got {settings['timeout']}")
    try:
        settings["title"].encode("latin-1")  # HTTP header values are latin-1
    except UnicodeEncodeError:
        raise ValueError(f"option 'title' must use latin-1 characters only, got {settings['title']!r}") from None
    headers = {}
    for key, value in settings["headers"].items():
        if not isinstance(value, str):
            raise ValueError(f"option 'headers': the value of {key!r} must be a string")
        if len(value) >= 8:  # a credential; a short word such as a tag name is not worth masking
            logs.add_secret(value)
        headers[key] = value
    if settings["token_file"]:
        try:
            token = Path(settings["token_file"]).read_text().strip()
        except OSError as e:
            raise ValueError(f"option 'token_file': cannot read {settings['token_file']}: {e.strerror}") from None
        if not token:
            raise ValueError(f"option 'token_file': {settings['token_file']} is empty")
        logs.add_secret(token)
        headers["Authorization"] = f"Bearer {token}"
    _display_url = secret_url(settings["url"])
    _settings, _headers = settings, headers


def status_of(exit_code: int) -> str:
    """``success`` for exit code 0, ``warning`` for 1, ``failure`` otherwise."""
    return "success" if exit_code == 0 else "warning" if exit_code == 1 else "failure"


def json_payload(job: str, command: str, results: list[dict], exit_code: int) -> dict:
    """The JSON document posted for a run (see the module docstring)."""
    return {
        "source": "ovirt-borg", "job": job, "host": socket.gethostname(), "command": command,
        "status": status_of(exit_code), "exit_code": exit_code,
        "vms": [{"vm": r.get("vm"), "ok": bool(r.get("ok")), "exit_code": r.get("exit_code", 0),
                 "error": r.get("error", ""), "mode": r.get("mode", ""), "archive": r.get("archive", ""),
                 "seconds": r.get("seconds", 0),
                 "bytes_read": sum(d.get("bytes_read", 0) for d in r.get("disks") or [])}
                for r in results],
    }


def ntfy_message(job: str, results: list[dict], exit_code: int) -> str:
    """The plain-text ntfy message for a run: one line for the run, one per VM."""
    failed = [r for r in results if not r.get("ok")]
    lines = [f"job {job}: {len(results) - len(failed)} of {len(results)} VM(s) backed up, exit code {exit_code}"]
    for r in results:
        if r.get("ok"):
            lines.append(f"{r.get('vm')}: {r.get('mode')} in {r.get('seconds', 0):.0f} s")
        else:
            lines.append(f"{r.get('vm')}: FAILED: {r.get('error')}")
    return "\n".join(lines)


def send(job: str, command: str, results: list[dict], exit_code: int) -> bool:
    """Post the run's notification; return True when the endpoint answered 2xx.

    On any failure logs a warning (secrets masked) and returns False. Never raises.
    """
    if _settings is None:
        return False
    headers = dict(_headers)
    if _settings["format"] == "ntfy":
        ok = exit_code == 0
        headers.update({"Title": f"{_settings['title']}: {status_of(exit_code)}",
                        "Priority": "default" if ok else _settings["priority"],
                        "Tags": "white_check_mark" if ok else "warning"})
        body = ntfy_message(job, results, exit_code).encode()
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    else:
        body = json.dumps(json_payload(job, command, results, exit_code)).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        response = requests.post(_settings["url"], data=body, headers=headers,
                                 timeout=(_settings["timeout"], _settings["timeout"]))
        if response.status_code >= 300:
            log.warning("webhook: %s answered HTTP %s", _display_url, response.status_code)
            return False
    except (requests.RequestException, OSError, ValueError) as e:  # never fails a backup
        log.warning("webhook: cannot notify %s: %s", _display_url, logs.mask(f"{type(e).__name__}: {e}"))
        return False
    log.debug("webhook: %s notification sent to %s", status_of(exit_code), _display_url)
    return True


@hookimpl
def ovirt_borg_run_finished(config: Any, command: str, results: list, exit_code: int) -> None:
    if _settings is None or command != "backup":
        return
    if exit_code == 0 and _settings["when"] == "failure":
        return
    send(Path(getattr(config, "path", "") or "ovirt-borg").stem, command, results, exit_code)

"""Healthchecks.io (or a self-hosted Healthchecks) pings for backup runs.

Enabled by a ``[hooks.healthchecks]`` section::

    [hooks.healthchecks]
    url = "https://hc-ping.com/your-check-uuid"
    timeout = 10

At the start of a backup run it pings ``<url>/start``; when the run ends with exit code 0 it
pings ``<url>``, otherwise ``<url>/fail`` (a warning, exit 1, is a VM that was not backed up:
it needs attention, so it fails the check too). Every ping carries a short text body (the
totals, then each VM's outcome, the failed ones first) and the same ``rid`` so that Healthchecks pairs start and
end and measures the run's duration.

A ping that fails (endpoint down, timeout, HTTP error) is logged as a warning and never fails
the backup. The URL's path holds the check's secret, so it is masked in every log line.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from ovirt_borg import logs
from ovirt_borg.plugins import REQUIRED, hookimpl, plugin_options, secret_url

log = logging.getLogger(__name__)

OPTIONS = {
    "url": (str, REQUIRED),
    "timeout": (float, 10.0),
}
MAX_BODY = 10_000  # bytes; Healthchecks keeps up to 100 kB of a ping body, a summary needs far less

_settings: dict[str, Any] | None = None
_display_url = ""
_run_id = ""


def configure(options: dict[str, Any]) -> None:
    """Take the ``[hooks.healthchecks]`` options; raises ValueError for a bad or missing one."""
    global _settings, _display_url
    settings = plugin_options(options, OPTIONS)
    if settings["timeout"] <= 0:
        raise ValueError(f"option 'timeout' must be positive, got {settings['timeout']}")
    _display_url = secret_url(settings["url"])
    _settings = settings


def ping_url(url: str, suffix: str, run_id: str) -> str:
    """Given the check URL, an endpoint suffix ('start', 'fail' or '') and the run id, return
    the URL to ping: the suffix appended to the path, ``rid`` added to any query."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") + (f"/{suffix}" if suffix else "")
    query = "&".join(q for q in (parts.query, f"rid={run_id}") if q)
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def ping(suffix: str, body: str) -> bool:
    """Send one ping (``suffix`` as for ``ping_url``) with a text ``body``.

    Returns True when Healthchecks answered 2xx; on any failure logs a warning (secrets
    masked) and returns False. Never raises.
    """
    if _settings is None:
        return False
    url = ping_url(_settings["url"], suffix, _run_id or str(uuid.uuid4()))
    kind = suffix or "success"
    try:
        response = requests.post(url, data=body.encode()[:MAX_BODY],
                                  headers={"Content-Type": "text/plain; charset=utf-8"},
                                  timeout=(_settings["timeout"], _settings["timeout"]))
        if response.status_code >= 300:
            log.warning("healthchecks: the %s ping to %s answered HTTP %s", kind, _display_url,
                        response.status_code)
            return False
    except (requests.RequestException, OSError, ValueError) as e:  # a ping never fails a backup
        log.warning("healthchecks: the %s ping to %s failed: %s", kind, _display_url,
                    logs.mask(f"{type(e).__name__}: {e}"))
        return False
    log.debug("healthchecks: %s ping sent to %s", kind, _display_url)
    return True


def summary(results: list[dict], exit_code: int, limit: int = MAX_BODY) -> str:
    """Given a run's results and exit code, return the text of the end ping's body.

    The first lines hold the totals (VMs backed up, failed, skipped; bytes read and stored), then
    one line per VM, the failed and skipped ones first: when a large estate's lines pass
    ``limit`` bytes, the lines that need attention are kept and the rest is counted.
    """
    failed = [r for r in results if not r.get("ok")]
    done = [r for r in results if r.get("ok")]
    skipped = [r for r in failed if str(r.get("error", "")).startswith("skipped:")]
    read = sum(d.get("bytes_read", 0) for r in done for d in r.get("disks", []))
    stored = sum(d.get("stored", 0) for r in done for d in r.get("disks", []))
    head = [f"ovirt-borg backup finished with exit code {exit_code}",
            f"{len(done)} of {len(results)} VM(s) backed up, {len(failed) - len(skipped)} failed, "
            f"{len(skipped)} skipped; {read / 2**20:.1f} MiB read, {stored / 2**20:.1f} MiB stored"]
    lines = [f"{r.get('vm')}: FAILED (exit {r.get('exit_code')}): {r.get('error')}" for r in failed]
    lines += [f"{r.get('vm')}: {r.get('mode')} backup in {r.get('seconds', 0):.1f} s, archive {r.get('archive')}"
              for r in done]
    text = "\n".join(head) + "\n"
    for number, line in enumerate(lines):
        more = f"... and {len(lines) - number} more VM(s)\n"
        if len((text + line + "\n" + more).encode()) > limit:
            return text + more
        text += line + "\n"
    return text


@hookimpl
def ovirt_borg_run_started(config: Any, command: str, vms: list) -> None:
    global _run_id
    if _settings is None or command != "backup":
        return
    _run_id = str(uuid.uuid4())
    names = ", ".join(vm.name for vm in vms)
    ping("start", f"ovirt-borg backup of {len(vms)} VM(s) started: {names}\n")


@hookimpl
def ovirt_borg_run_finished(config: Any, command: str, results: list, exit_code: int) -> None:
    if _settings is None or command != "backup":
        return
    ping("" if exit_code == 0 else "fail", summary(results, exit_code))

"""What every engine answer is made of: ids, dates, the API path and refusals (``ApiFault``)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

ZERO_ID = "00000000-0000-0000-0000-000000000000"
API_PATH = "/ovirt-engine/api"


class ApiFault(Exception):
    """An engine refusal: HTTP status, fault reason and detail (rendered as fault XML).

    The detail follows the engine's ``[Cannot <action> <object>. <why>.]`` wording.
    """

    def __init__(self, status: int, detail: str, reason: str = "Operation Failed"):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class AuthFailed(Exception):
    """SSO refused the credentials (rendered as JSON ``access_denied``)."""


def not_found(kind: str, ident: str) -> ApiFault:
    """Given an entity kind and the id or name asked for, return the engine's 404 fault."""
    return ApiFault(404, f"Entity not found: {kind}: {ident}", reason="Resource not found")


def _cannot(status: int, action: str, why: str) -> ApiFault:
    return ApiFault(status, f"[Cannot {action}. {why}]")


def new_id() -> str:
    """Return a fresh engine-style UUID."""
    return str(uuid.uuid4())


def timestamp(when: datetime | None = None) -> str:
    """Return an engine date string such as ``2024-01-01T10:00:00.000+00:00``."""
    when = when or datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+00:00"

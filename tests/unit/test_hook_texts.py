"""The texts the ready plugins send (no lab, no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HOOKS = Path(__file__).resolve().parents[2] / "hooks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"hook_{name}", HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ok(vm: str, read: int = 2**20, stored: int = 2**19) -> dict:
    return {"vm": vm, "ok": True, "mode": "incremental", "seconds": 1.25, "archive": f"{vm}-2026",
            "disks": [{"bytes_read": read, "stored": stored}], "exit_code": 0}


def failed(vm: str, error: str = "HTTP 500", code: int = 4) -> dict:
    return {"vm": vm, "ok": False, "error": error, "exit_code": code, "disks": []}


def test_healthchecks_summary_has_totals_then_failures_first():
    text = load("healthchecks").summary(
        [ok("a"), failed("b"), failed("c", "skipped: vetoed", 1), ok("d", 3 * 2**20, 2**20)], 4)
    lines = text.splitlines()
    assert lines[0] == "ovirt-borg backup finished with exit code 4"
    assert lines[1] == "2 of 4 VM(s) backed up, 1 failed, 1 skipped; 4.0 MiB read, 1.5 MiB stored"
    assert lines[2:] == ["b: FAILED (exit 4): HTTP 500", "c: FAILED (exit 1): skipped: vetoed",
                         "a: incremental backup in 1.2 s, archive a-2026",
                         "d: incremental backup in 1.2 s, archive d-2026"]


def test_healthchecks_summary_of_a_large_estate_keeps_the_failures_within_the_limit():
    healthchecks = load("healthchecks")
    results = [ok(f"vm{n:04d}") for n in range(1000)] + [failed("broken")]
    text = healthchecks.summary(results, 4)
    assert len(text.encode()) <= healthchecks.MAX_BODY
    lines = text.splitlines()
    assert lines[2] == "broken: FAILED (exit 4): HTTP 500"
    kept = len(lines) - 4  # the totals, the failure, the count of the rest
    assert lines[-1] == f"... and {1000 - kept} more VM(s)"
    assert "1000 of 1001 VM(s) backed up, 1 failed, 0 skipped" in lines[1]

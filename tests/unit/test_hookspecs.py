"""Every hook specification (ovirt_borg/hookspecs.py) has a docstring and its signature in
docs/PLUGINS.md. That every hook is called is checked through the lab in tests/test_plugins.py."""

from __future__ import annotations

import inspect
from pathlib import Path

from ovirt_borg import hookspecs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "PLUGINS.md"


def test_every_hookspec_has_a_docstring_and_a_documented_signature():
    docs = DOCS.read_text()
    specs = {name: f for name, f in vars(hookspecs).items() if name.startswith("ovirt_borg_") and callable(f)}
    assert len(specs) >= 7
    for name, function in specs.items():
        assert (function.__doc__ or "").strip(), f"{name} has no docstring"
        params = ", ".join(inspect.signature(function).parameters)
        assert f"{name}({params})" in docs, f"docs/PLUGINS.md lacks the signature {name}({params})"

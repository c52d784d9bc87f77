"""The engine's search language (``name=web* and tag=prod``), as the lab understands it."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable

from ovirt_borg.lab.model.api import ApiFault


_SEARCH_TOKEN = re.compile(
    r"""\s*(?:
        (?P<conj>and|or)(?=\s|$)
      | (?P<key>[A-Za-z_][\w.]*)\s*(?P<op>!=|=)\s*(?P<val>"[^"]*"|'[^']*'|[^\s"']+)
      | (?P<bare>"[^"]*"|[^\s"'=!]+)
    )""",
    re.VERBOSE | re.IGNORECASE,
)

SearchTerm = tuple[str, str, str]  # key, op, value


def parse_search(text: str) -> list[list[SearchTerm]]:
    """Given an engine search string, return OR-groups of AND-ed ``(key, op, value)`` terms.

    Accepts ``name=web* and tag=prod``, ``cluster=Default status=up`` (space means and),
    ``name=a or name=b``, quoted values and an optional ``Vms:`` prefix; a bare word
    matches the name. Raises ``ApiFault`` (400) for text it cannot read.
    """
    text = text.strip()
    text = re.sub(r"^\w+\s*:\s*", "", text) if re.match(r"^\w+\s*:", text) else text
    groups: list[list[SearchTerm]] = [[]]
    pos = 0
    while pos < len(text):
        match = _SEARCH_TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ApiFault(400, f"Search query [{text}] is invalid")
        pos = match.end()
        if match.group("conj"):
            if match.group("conj").lower() == "or":
                groups.append([])
            continue
        if match.group("key"):
            value = match.group("val")
            if value[:1] in "\"'":
                value = value[1:-1]
            groups[-1].append((match.group("key").lower(), match.group("op"), value))
        elif match.group("bare"):
            value = match.group("bare").strip("\"'")
            groups[-1].append(("name", "=", value))
    return [g for g in groups if g] or [[]]


def matches_search(groups: list[list[SearchTerm]], fields: Callable[[str], list[str] | None],
                   *, case_sensitive: bool = True) -> bool:
    """Return True when an object matches the parsed search.

    ``fields(key)`` returns the object's values for a search key (a VM has several tags), or
    None when the key is unknown, which is a 400 fault as on the engine.
    """
    def term_ok(key: str, op: str, pattern: str) -> bool:
        values = fields(key)
        if values is None:
            raise ApiFault(400, f"Search query is invalid: unknown field '{key}'")
        if not case_sensitive or key != "name":
            pattern = pattern.lower()
            values = [v.lower() for v in values]
        hit = any(fnmatch.fnmatchcase(v, pattern) for v in values)
        return hit if op == "=" else not hit

    return any(all(term_ok(*term) for term in group) for group in groups)

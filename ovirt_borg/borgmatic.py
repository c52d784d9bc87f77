"""Read what ovirt-borg needs from an existing borgmatic configuration.

Users who already run borgmatic keep their repository, passphrase and Borg settings in its YAML
file. With ``[repository] borgmatic_config = "/etc/borgmatic/config.yaml"`` ovirt-borg takes the
repository and the passphrase (command) from there, so secrets are not written twice.

Both shapes of borgmatic configuration are read:

- borgmatic 1.x: options in sections (``location:``, ``storage:``, ``retention:``,
  ``consistency:``, ``output:``, ``hooks:``), ``repositories`` a list of strings;
- borgmatic 1.8 / 2.x: flat options, ``repositories`` a list of ``{path, label}`` mappings that
  may carry options of their own for that repository.

As borgmatic does, the reader resolves ``!include`` (also merged with ``<<: !include FILE``,
with ``!retain`` and ``!omit``), ``constants`` (``{name}``), environment variables
(``${NAME}``, ``${NAME:-default}``) and, in ``encryption_passphrase``, the ``{credential
systemd NAME}`` and ``{credential file PATH}`` forms. Environment variables are resolved only in
the options ovirt-borg uses: borgmatic's own service may define variables that ovirt-borg's
does not.

YAML is parsed with ruamel.yaml, which borgmatic itself depends on; it is imported only when a
borgmatic configuration is named, and its absence is a ``ConfigError`` saying what to install.

The module also works out which of ovirt-borg's archives borgmatic's ``prune`` and ``check``
could reach (:func:`overlap_warnings`): with Borg 1.x borgmatic limits them to ``--glob-archives``
derived from ``match_archives``, the deprecated ``prefix`` or ``archive_name_format``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ovirt_borg.errors import ConfigError

__all__ = [
    "BorgmaticSettings",
    "DEFAULT_ARCHIVE_NAME_FORMAT",
    "archive_glob",
    "created_names_glob",
    "load",
    "overlap_warnings",
    "read_config",
]

log = logging.getLogger(__name__)

#: borgmatic's archive name format with Borg 1.x when ``archive_name_format`` is not set.
DEFAULT_ARCHIVE_NAME_FORMAT = "{hostname}-{now:%Y-%m-%dT%H:%M:%S.%f}"

#: The sections of borgmatic 1.x whose options borgmatic >= 1.8 moves to the top level (in order).
_SECTIONS = ("location", "storage", "retention", "consistency", "output", "hooks")

#: Options of a repository entry that describe the entry itself, not options for that repository.
_REPOSITORY_OWN_OPTIONS = frozenset({"path", "label", "encryption", "append_only", "storage_quota",
                                     "make_parent_directories", "id_hash", "key_location"})

#: borgmatic options that become Borg environment variables (as borgmatic hands them to Borg).
_ENVIRONMENT_OPTIONS = {
    "ssh_command": "BORG_RSH",
    "remote_path": "BORG_REMOTE_PATH",
    "borg_base_directory": "BORG_BASE_DIR",
    "borg_config_directory": "BORG_CONFIG_DIR",
    "borg_cache_directory": "BORG_CACHE_DIR",
    "borg_security_directory": "BORG_SECURITY_DIR",
    "borg_keys_directory": "BORG_KEYS_DIR",
    "borg_key_file": "BORG_KEY_FILE",
}
_BOOLEAN_ENVIRONMENT_OPTIONS = {
    "relocated_repo_access_is_ok": "BORG_RELOCATED_REPO_ACCESS_IS_OK",
    "unknown_unencrypted_repo_access_is_ok": "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK",
}

# Includes deeper than this are a loop.
_MAX_INCLUDE_DEPTH = 16

_MERGE_TAG = "tag:yaml.org,2002:merge"
_ENV_VARIABLE = re.compile(r"(?P<escape>\\)?(?P<whole>\$\{(?P<name>[A-Za-z0-9_]+)(?:(?::?-)(?P<default>[^}]+))?\})")
_CONSTANT = re.compile(r"(?P<left>\\)?\{(?P<name>\w+)(?P<right>\\)?\}")
_CREDENTIAL = re.compile(r"\{credential(?: +(?P<what>.*))?\}")
_CREDENTIAL_NAME = re.compile(r"[\w.-]+")
_PLACEHOLDER = re.compile(r"\{(?P<name>[\w-]+)(?::(?P<format>[^}]*))?\}")
_TIME_PLACEHOLDERS = frozenset({"now", "utcnow", "unixtime", "pid", "uuid4"})
# ovirt-borg's archive names end with their UTC time: ...T03:00:00Z.
_OWN_NAME_END = "Z"


@dataclass(frozen=True)
class BorgmaticSettings:
    """What ovirt-borg takes from a borgmatic configuration, for one of its repositories.

    ``repository`` is the location (path or URL) and ``label`` its borgmatic label (or "");
    ``passphrase`` / ``passcommand`` the resolved ``encryption_passphrase`` /
    ``encryption_passcommand`` (None when not set; borgmatic prefers the passphrase when both
    are); ``environment`` the Borg variables borgmatic derives from its options (``BORG_RSH``,
    ``BORG_REMOTE_PATH``, ``BORG_BASE_DIR``, ...). ``archive_name_format``, ``match_archives``
    and ``prefix`` say which archives borgmatic creates, prunes and checks, with
    ``archive_hostname`` / ``archive_username`` standing for Borg's ``{hostname}`` / ``{user}``
    when set. ``repositories`` lists every repository path of the file.
    """

    config_path: str
    repository: str
    label: str = ""
    passphrase: str | None = field(default=None, repr=False)
    passcommand: str | None = field(default=None, repr=False)
    environment: dict[str, str] = field(default_factory=dict)
    archive_name_format: str | None = None
    match_archives: str | None = None
    prefix: str | None = None
    archive_hostname: str | None = None
    archive_username: str | None = None
    lock_wait: int | None = None
    working_directory: str | None = None
    repositories: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# YAML with borgmatic's tags


class _Retained(dict):
    """A mapping tagged ``!retain``: it replaces what an include gives instead of merging."""


class _RetainedList(list):
    """A list tagged ``!retain``: it replaces what an include gives instead of extending it."""


@dataclass(frozen=True)
class _Omit:
    """A list element tagged ``!omit``: removes that value from the list an include gives."""

    value: Any


def _ruamel():
    try:
        import ruamel.yaml
    except ImportError:
        raise ConfigError(
            "reading a borgmatic configuration needs the Python package ruamel.yaml (borgmatic "
            "depends on it): install it where ovirt-borg runs (pip install ruamel.yaml, or "
            "apt-get install python3-ruamel.yaml for a system-wide install), or set "
            "repository.location and repository.passcommand instead of repository.borgmatic_config"
        ) from None
    return ruamel.yaml


def _deep_merge(base: Any, overlay: Any) -> Any:
    """Merge ``overlay`` (the including file) over ``base`` (an included file), as borgmatic does.

    Mappings merge key by key, lists are joined (included items first) minus the ``!omit``
    values, anything else is replaced; ``!retain`` mappings and lists replace instead of merging.
    """
    if isinstance(base, dict) and isinstance(overlay, dict) and not isinstance(overlay, _Retained):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = _deep_merge(merged[key], value) if key in merged else value
        return merged
    if isinstance(base, list) and isinstance(overlay, list) and not isinstance(overlay, _RetainedList):
        omitted = [item.value for item in overlay if isinstance(item, _Omit)]
        return [item for item in base + overlay if not isinstance(item, _Omit) and item not in omitted]
    return overlay


def _strip_markers(value: Any) -> Any:
    """Return ``value`` as plain dicts and lists, ``!omit`` elements outside a merge dropped."""
    if isinstance(value, dict):
        return {key: _strip_markers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strip_markers(item) for item in value if not isinstance(item, _Omit)]
    if isinstance(value, _Omit):
        return _strip_markers(value.value)
    return value


def _load_yaml(path: Path, depth: int = 0) -> Any:
    """Parse one borgmatic YAML file, following its includes; raises ConfigError."""
    ruamel_yaml = _ruamel()
    if depth > _MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: borgmatic includes nest deeper than {_MAX_INCLUDE_DEPTH} levels (a loop?)")
    nodes = ruamel_yaml.nodes

    def include(constructor, node) -> Any:
        if isinstance(node, nodes.ScalarNode):
            return _load_yaml(_include_path(node.value, path), depth + 1)
        if isinstance(node, nodes.SequenceNode) and all(isinstance(n, nodes.ScalarNode) for n in node.value):
            return [_load_yaml(_include_path(n.value, path), depth + 1) for n in node.value]
        raise ConfigError(f"{path}: !include takes a file name or a list of file names")

    def retain(constructor, node) -> Any:
        if isinstance(node, nodes.MappingNode):
            return _Retained(constructor.construct_mapping(node, deep=True))
        if isinstance(node, nodes.SequenceNode):
            return _RetainedList(constructor.construct_sequence(node, deep=True))
        raise ConfigError(f"{path}: !retain may only tag a mapping or a list")

    def omit(constructor, node) -> Any:
        if not isinstance(node, nodes.ScalarNode):
            raise ConfigError(f"{path}: !omit may only tag a scalar (a list element)")
        return _Omit(constructor.construct_scalar(node))

    class Constructor(ruamel_yaml.SafeConstructor):
        def construct_mapping(self, node, deep=False):
            # "<<: !include FILE" merges the included mappings under this one (borgmatic's deep
            # merge); plain YAML merges ("<<: *anchor") are left to ruamel.
            includes = [value for key, value in node.value if key.tag == _MERGE_TAG and value.tag == "!include"]
            if not includes:
                return super().construct_mapping(node, deep=deep)
            node.value = [(key, value) for key, value in node.value
                          if not (key.tag == _MERGE_TAG and value.tag == "!include")]
            local = super().construct_mapping(node, deep=True)
            merged: Any = {}
            for value_node in includes:
                included = include(self, value_node)
                for piece in (included if isinstance(value_node, nodes.SequenceNode) else [included]):
                    if not isinstance(piece, dict):
                        raise ConfigError(f"{path}: '<<: !include' needs files holding mappings")
                    merged = _deep_merge(merged, piece)
            return _deep_merge(merged, local)

    Constructor.add_constructor("!include", include)
    Constructor.add_constructor("!retain", retain)
    Constructor.add_constructor("!omit", omit)
    yaml = ruamel_yaml.YAML(typ="safe")
    yaml.Constructor = Constructor
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"borgmatic configuration {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"borgmatic configuration {path} is a directory: name one YAML file of it") from None
    except OSError as e:
        raise ConfigError(f"cannot read the borgmatic configuration {path}: {e.strerror}") from None
    try:
        return yaml.load(text)
    except ruamel_yaml.YAMLError as e:
        raise ConfigError(f"borgmatic configuration {path} is not valid YAML: {e}") from None


def _include_path(name: str, including: Path) -> Path:
    candidate = Path(os.path.expanduser(name))
    if candidate.is_absolute():
        return candidate
    # borgmatic looks next to the including file and in the current directory.
    for directory in (including.parent, Path.cwd()):
        if (directory / candidate).exists():
            return directory / candidate
    raise ConfigError(f"{including}: included file {name} not found next to it nor in {Path.cwd()}")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Return the borgmatic configuration in ``path`` in the flat (borgmatic >= 1.8) shape.

    Includes are followed and merged, the 1.x sections lifted to the top level, and
    ``repositories`` made a list of mappings with a ``path``. Constants and environment
    variables are not resolved yet (see :func:`load`). Raises ``ConfigError`` when the file is
    missing, unreadable or not a borgmatic configuration, or when ruamel.yaml is not installed.
    """
    path = Path(path)
    data = _strip_markers(_load_yaml(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a borgmatic configuration (it holds no options)")
    config = dict(data)
    for section in _SECTIONS:
        options = config.pop(section, None)
        if options is None:
            continue
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: the borgmatic section '{section}:' must hold options")
        config.update(options)
    repositories = config.get("repositories") or []
    if not isinstance(repositories, list):
        raise ConfigError(f"{path}: 'repositories' must be a list")
    entries = []
    for entry in repositories:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{path}: every entry of 'repositories' needs a path (got {entry!r})")
        entries.append(entry)
    config["repositories"] = entries
    return config


# --------------------------------------------------------------------------------------------
# Values: constants, environment variables, credentials


def _resolve(value: Any, constants: dict[str, Any], option: str, source: Path) -> Any:
    """Apply borgmatic's constants, then environment variables, to one option's value."""
    if not isinstance(value, str):
        return value

    def constant(match: re.Match) -> str:
        name = match["name"]
        if match["left"] and match["right"]:
            return "{" + name + "}"
        if name in constants and constants[name] is not None:
            return str(constants[name])
        return match[0]

    def variable(match: re.Match) -> str:
        if match["escape"]:
            return match["whole"]
        found = os.environ.get(match["name"], match["default"])
        if found is None:
            raise ConfigError(
                f"{source}: '{option}' uses ${{{match['name']}}}, which is not set in ovirt-borg's "
                f"environment (borgmatic's service may set it; give ovirt-borg the same variable "
                f"or a default: ${{{match['name']}:-...}})")
        return found

    if constants:
        value = _CONSTANT.sub(constant, value)
    return _ENV_VARIABLE.sub(variable, value)


def _credential(value: str, working_directory: str | None, source: Path) -> str:
    """Resolve ``{credential systemd NAME}`` / ``{credential file PATH}``; return others unchanged."""
    match = _CREDENTIAL.fullmatch(value)
    if not match:
        return value
    try:
        words = shlex.split(match["what"] or "")
    except ValueError:
        words = []
    if len(words) < 2:
        raise ConfigError(f"{source}: encryption_passphrase: cannot read the credential {value!r} "
                          "(expected {credential systemd NAME} or {credential file PATH})")
    kind, name = words[0], " ".join(words[1:])
    if kind in ("systemd", "file") and len(words) != 2:
        raise ConfigError(f"{source}: encryption_passphrase: the {kind} credential takes one name, "
                          f"got {value!r}")
    if kind == "systemd":
        if not _CREDENTIAL_NAME.fullmatch(name):
            raise ConfigError(f"{source}: encryption_passphrase: invalid systemd credential name {name!r}")
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"{source}: encryption_passphrase comes from the systemd credential {name!r}, but "
                f"ovirt-borg runs without $CREDENTIALS_DIRECTORY: add LoadCredential={name}:... "
                f"(or LoadCredentialEncrypted=) to the ovirt-borg service")
        credential_path = Path(directory) / name
    elif kind == "file":
        credential_path = Path(working_directory or "") / os.path.expanduser(name)
    else:
        raise ConfigError(
            f"{source}: encryption_passphrase uses the {kind!r} credential hook, which ovirt-borg "
            f"cannot read; use encryption_passcommand in borgmatic, or set repository.passcommand "
            f"in ovirt-borg's configuration")
    try:
        secret = credential_path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the passphrase credential {credential_path}: "
                          f"{e.strerror}") from None
    if not secret:
        raise ConfigError(f"{source}: the passphrase credential {credential_path} is empty")
    return secret


def _local_path(location: str, working_directory: str | None) -> str:
    """A repository location as Borg 1.4 takes it: ``file://`` and ``~`` expanded for local paths."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    elif ":" in location:
        return location
    location = os.path.expanduser(location)
    if working_directory and not os.path.isabs(location):
        location = os.path.join(working_directory, location)
    return location


def _matches(entry: dict, wanted: str, working_directory: str | None) -> bool:
    if entry.get("label") and entry["label"] == wanted:
        return True
    path = _local_path(entry["path"], working_directory)
    wanted_path = _local_path(wanted, working_directory)
    if ":" in path:
        return path.rstrip("/") == wanted_path.rstrip("/")
    return os.path.normpath(os.path.abspath(path)) == os.path.normpath(os.path.abspath(wanted_path))


def load(path: str | os.PathLike, repository: str | None = None) -> BorgmaticSettings:
    """Return what ovirt-borg uses from the borgmatic configuration ``path``.

    Given the file and, optionally, the repository ovirt-borg was told to use (a location, or
    the label of one of borgmatic's repositories). Without one, the file must name exactly one
    repository. With one that borgmatic does not know, borgmatic's global options still apply
    and the given location is kept. Options set under a repository entry apply to that
    repository, as in borgmatic. Raises ``ConfigError`` for a missing, unreadable or unusable
    configuration (no repository, several without a choice, an unset environment variable, an
    unreadable credential, ruamel.yaml not installed).
    """
    source = Path(path)
    config = read_config(source)
    entries = config["repositories"]
    constants = config.get("constants") or {}
    if not isinstance(constants, dict):
        raise ConfigError(f"{source}: 'constants' must be a mapping")
    global_working_directory = _resolve(config.get("working_directory"), constants, "working_directory", source)
    resolved_entries = [dict(entry, path=_resolve(entry["path"], constants, "repositories", source),
                             label=_resolve(entry.get("label") or "", constants, "repositories", source))
                        for entry in entries]
    chosen: dict | None = None
    if repository:
        chosen = next((e for e in resolved_entries if _matches(e, repository, global_working_directory)), None)
        if chosen is None:
            log.info("repository %s is not among the repositories of %s; using its global options",
                     repository, source)
    elif len(resolved_entries) == 1:
        chosen = resolved_entries[0]
    elif not resolved_entries:
        raise ConfigError(f"{source} names no repository; set repository.location in ovirt-borg's configuration")
    else:
        names = ", ".join(e["label"] or e["path"] for e in resolved_entries)
        raise ConfigError(f"{source} names several repositories ({names}); choose one with "
                          f"repository.location (its path or its label) in ovirt-borg's configuration")

    options = dict(config)
    if chosen is not None:
        options.update({k: v for k, v in chosen.items() if k not in _REPOSITORY_OWN_OPTIONS})

    def option(name: str, kind: type = str) -> Any:
        value = _resolve(options.get(name), constants, name, source)
        if value is None:
            return None
        if kind is int and isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: borgmatic option '{name}' must be {kind.__name__}, got {value!r}")
        return value

    working_directory = option("working_directory")
    if chosen is not None:
        location = _local_path(chosen["path"], working_directory)
        label = chosen["label"]
    else:
        location, label = repository, ""
    passphrase = option("encryption_passphrase")
    if passphrase is not None:
        passphrase = _credential(passphrase, working_directory, source)
    environment = {}
    for name, variable in _ENVIRONMENT_OPTIONS.items():
        value = option(name)
        if value:
            environment[variable] = value
    for name, variable in _BOOLEAN_ENVIRONMENT_OPTIONS.items():
        value = option(name, bool)
        if value is not None:
            environment[variable] = "yes" if value else "no"
    settings = BorgmaticSettings(
        config_path=str(source), repository=location, label=label, passphrase=passphrase or None,
        passcommand=option("encryption_passcommand") or None, environment=environment,
        archive_name_format=option("archive_name_format"), match_archives=option("match_archives"),
        prefix=option("prefix"), archive_hostname=option("archive_hostname"),
        archive_username=option("archive_username"), lock_wait=option("lock_wait", int),
        working_directory=working_directory,
        repositories=tuple(e["path"] for e in resolved_entries))
    log.debug("borgmatic configuration %s: repository %s%s, passphrase from %s", source, location,
              f" ({label})" if label else "",
              "encryption_passphrase" if settings.passphrase else
              "encryption_passcommand" if settings.passcommand else "nowhere")
    return settings


# --------------------------------------------------------------------------------------------
# Which archives borgmatic reaches (pure)


def _placeholder_values(settings: BorgmaticSettings, hostname: str | None, fqdn: str | None,
                        user: str | None) -> dict[str, str]:
    """The values Borg gives ``{hostname}``, ``{fqdn}``, ``{reverse-fqdn}`` and ``{user}`` for borgmatic."""
    # borgmatic hands archive_hostname / archive_username to Borg as BORG_HOSTNAME / BORG_USERNAME.
    hostname = settings.archive_hostname or hostname
    user = settings.archive_username or user
    if hostname is None:
        hostname = os.environ.get("BORG_HOSTNAME") or socket.gethostname().split(".")[0]
    if fqdn is None:
        fqdn = socket.getfqdn()
    if user is None:
        import getpass

        user = os.environ.get("BORG_USERNAME") or getpass.getuser()
    return {"hostname": hostname, "fqdn": fqdn, "reverse-fqdn": ".".join(reversed(fqdn.split("."))), "user": user}


def _expand(pattern: str, values: dict[str, str], *, sample_times: bool = False) -> str:
    """Expand Borg placeholders in ``pattern``: known ones by value, the others as ``*``.

    With ``sample_times``, ``{now}``, ``{utcnow}``, ``{unixtime}`` and ``{pid}`` take this
    moment's values instead (to see how names borgmatic writes begin).
    """
    def value(match: re.Match) -> str:
        name = match["name"]
        if name in _TIME_PLACEHOLDERS:
            if not sample_times or name == "uuid4":
                return "*"
            moment = datetime.now(timezone.utc) if name == "utcnow" else datetime.now()
            if name in ("now", "utcnow"):
                return moment.strftime(match["format"] or "%Y-%m-%dT%H:%M:%S")
            return str(int(moment.timestamp())) if name == "unixtime" else str(os.getpid())
        return values.get(name, "*")

    return _PLACEHOLDER.sub(value, pattern)


def archive_glob(settings: BorgmaticSettings, *, hostname: str | None = None, fqdn: str | None = None,
                 user: str | None = None) -> str | None:
    """Return the archive glob borgmatic's ``prune`` and ``check`` use with Borg 1.x.

    Given the settings and, for tests, the values of Borg's placeholders (default: this host's;
    borgmatic's ``archive_hostname`` / ``archive_username`` win, as they do in borgmatic).
    Returns the ``--glob-archives`` pattern with placeholders expanded (time placeholders as
    ``*``), or None when borgmatic works on every archive of the repository. A
    ``match_archives`` starting with ``re:`` is returned as it is.
    """
    values = _placeholder_values(settings, hostname, fqdn, user)
    if settings.prefix:
        return _expand(settings.prefix, values) + "*"
    if settings.match_archives:
        if settings.match_archives in ("*", "sh:*", "re:.*"):
            return None
        if settings.match_archives.startswith("re:"):
            return settings.match_archives
        return _expand(settings.match_archives.removeprefix("sh:"), values)
    glob = _expand(settings.archive_name_format or DEFAULT_ARCHIVE_NAME_FORMAT, values)
    return None if glob.strip("*") == "" else glob


def created_names_glob(settings: BorgmaticSettings, *, hostname: str | None = None, fqdn: str | None = None,
                       user: str | None = None) -> str:
    """Return how the archive names borgmatic's ``create`` writes look now (a glob).

    Time placeholders take this moment's values (their start is what matters for a prefix),
    ``{uuid4}`` becomes ``*``.
    """
    values = _placeholder_values(settings, hostname, fqdn, user)
    return _expand(settings.archive_name_format or DEFAULT_ARCHIVE_NAME_FORMAT, values, sample_times=True)


def _literal_start(glob: str) -> str:
    """The part of a glob before its first wildcard."""
    match = re.search(r"[*?\[]", glob)
    return glob if match is None else glob[:match.start()]


def _may_match_prefix(glob: str, prefix: str, *, own_names: bool = False) -> bool:
    """Whether ``glob`` can match some name starting with ``prefix`` (conservative: may say yes).

    With ``own_names``, only names that also end like ovirt-borg's archive names count.
    """
    start = _literal_start(glob)
    if start == glob:  # no wildcard: one exact name
        return glob.startswith(prefix) and (not own_names or glob.endswith(_OWN_NAME_END))
    end = re.split(r"[*?\]]", glob)[-1]
    if own_names and end and not end.endswith(_OWN_NAME_END):
        return False
    return start.startswith(prefix) or prefix.startswith(start)


def overlap_warnings(settings: BorgmaticSettings, prefix: str, *, hostname: str | None = None,
                     fqdn: str | None = None, user: str | None = None) -> list[str]:
    """Say how borgmatic and ovirt-borg could reach each other's archives in a shared repository.

    Given borgmatic's settings and ovirt-borg's archive prefix (and, for tests, the values of
    Borg's placeholders). Returns one message per problem, or an empty list when borgmatic's
    ``prune``/``check`` are limited to archives that cannot start with ``prefix`` and borgmatic
    never writes a name starting with it. Pure apart from reading the host name.
    """
    warnings = []
    glob = archive_glob(settings, hostname=hostname, fqdn=fqdn, user=user)
    advice = (f"set match_archives (or archive_name_format) in {settings.config_path} to a pattern "
              f"that only matches borgmatic's own archives and no name starting with {prefix!r}, "
              f"such as archive_name_format \"{{hostname}}-files-{{now}}\" with match_archives "
              f"\"sh:{{hostname}}-files-*\"")
    if glob is None:
        warnings.append(
            f"borgmatic's prune in {settings.config_path} applies its keep rules to every archive of "
            f"{settings.repository}, the VM archives ({prefix}*) included: {advice}")
    elif glob.startswith("re:"):
        warnings.append(
            f"borgmatic's match_archives {glob!r} in {settings.config_path} is a regular expression, "
            f"which Borg 1.x does not support in --glob-archives; {advice}")
    elif _may_match_prefix(glob, prefix, own_names=True):
        warnings.append(
            f"borgmatic's prune in {settings.config_path} works on archives matching {glob!r}, which "
            f"can include the VM archives ({prefix or 'no prefix'}*): {advice}, or give ovirt-borg "
            f"another repository.prefix")
    created = created_names_glob(settings, hostname=hostname, fqdn=fqdn, user=user)
    if _may_match_prefix(created, prefix):
        warnings.append(
            f"borgmatic's archive names ({created!r}) in {settings.config_path} can start with "
            f"ovirt-borg's prefix {prefix!r}, so ovirt-borg could take them for VM archives: "
            f"change archive_name_format or repository.prefix")
    return warnings

"""Configuration: one TOML file per job, validated into frozen dataclasses.

Every option is declared once, here, with its type, default and a one-line description; the
loader checks types, rejects unknown keys and reports the file, the key and what is expected.
``sample_config()`` renders the documented sample that ``ovirt-borg generate-config`` prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovirt_borg import archive
from ovirt_borg.backup import REBUILD_CHOICES
from ovirt_borg.errors import ConfigError, nearest_hint

DEFAULT_CONFIG_DIR = Path("/etc/ovirt-borg")
DEFAULT_STATE_DIR = "/var/lib/ovirt-borg"
#: The path of the engine's REST API (``/v4`` names its only version; a trailing slash is fine).
API_PATH = r"/ovirt-engine/api(/v4)?/?"

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Given ``4M``, ``64KiB``, ``1G`` or an int, return bytes; raises ValueError."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)(i?[bB])?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4M, 64K, 1G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def opt(default: Any, help: str, example: Any = None, *, minimum: float | None = None,
        maximum: float | None = None, above: float | None = None) -> Any:
    """A config option: its default, a one-line description and an example for the sample.

    ``minimum`` and ``maximum`` bound a number (inclusive), ``above`` is a bound it must exceed;
    the loader checks them (``_check_range``) and names the file and the key when one is not met.
    """
    factory = None
    if isinstance(default, (list, dict)):
        factory = lambda d=default: type(d)(d)  # noqa: E731
    meta = {"help": help, "example": example, "minimum": minimum, "maximum": maximum, "above": above}
    if factory:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class EngineConfig:
    """How to reach the oVirt engine."""

    url: str = opt(REQUIRED, "engine API URL", "https://engine.example.com/ovirt-engine/api")
    user: str = opt("admin@internal", "engine user (user@profile)", "backup@internal")
    password_file: str = opt(
        "", "file holding the engine password (or use the systemd credential 'engine-password')",
        "/etc/ovirt-borg/engine.password")
    ca_file: str = opt("", "CA certificate of the engine (default: the system trust store)",
                       "/etc/pki/ovirt-engine/ca.pem")
    insecure: bool = opt(False, "skip TLS verification of the engine and imageio (never in production)")
    allow_http: bool = opt(False, "allow a plain http:// engine URL (credentials then travel unencrypted)")
    timeout: float = opt(300.0, "seconds to wait for an engine operation (backup ready, transfer, disk)", above=0)
    poll_interval: float = opt(1.0, "seconds between polls of engine state", above=0)
    retries: int = opt(3, "times an engine read, finalize, cancel or delete is repeated after a transient "
                          "failure (HTTP 5xx, a lost connection), waiting poll_interval doubled each time",
                       minimum=0)


@dataclass(frozen=True)
class RepositoryConfig:
    """The Borg repository and how archives are written."""

    location: str = opt("", "Borg repository: a path or ssh://user@host/path (default: $BORG_REPO)",
                        "ssh://backup@borg.example.com/./ovirt")
    passcommand: str = opt("", "command printing the passphrase (BORG_PASSCOMMAND)",
                           "cat /etc/ovirt-borg/borg.passphrase")
    passphrase_file: str = opt("", "file holding the passphrase (or systemd credential 'borg-passphrase')")
    borgmatic_config: str = opt("", "take the repository, passphrase (command), ssh command, remote borg "
                                "and Borg directories from this borgmatic config",
                                "/etc/borgmatic/config.yaml")
    rsh: str = opt("", "ssh command for remote repositories (BORG_RSH)", "ssh -i /root/.ssh/borg")
    remote_path: str = opt("", "borg executable on the remote side (BORG_REMOTE_PATH)")
    prefix: str = opt("ovirt-", "prefix of every archive name this job writes, prunes or lists")
    compression: str = opt("lz4", "Borg compression spec", "zstd,3")
    block_size: str = opt("1M", "fixed block (chunk) size of disk images, a power of two 64K..16M; "
                          "a guest write re-reads and re-stores the whole block it touches", "4M")
    vm_block_sizes: dict[str, str] = opt({}, "block size of the VMs whose name matches a glob pattern "
                                         "(the first match wins), e.g. smaller blocks for VMs with "
                                         "small scattered writes; changing it makes a VM's next "
                                         "backup a full read", {"db-*": "256K"})
    writer: str = opt("internal", "'internal' (synthetic full, incremental) or 'cli' (borg import-tar, full reads)")
    rebuild_blocks: str = opt("auto", "a block an incremental finds changed in part: 'always' reads only its dirty "
                              "bytes from imageio and takes the rest from the previous archive's chunk for "
                              "the block (read from the repository), 'never' reads the whole block from "
                              "imageio, 'auto' rebuilds with a local repository and reads whole blocks "
                              "with a remote (ssh://) one", "always")
    lock_wait: int = opt(60, "seconds to wait for the repository lock held by another borg", minimum=0)

    @property
    def block_bytes(self) -> int:
        return parse_size(self.block_size)

    def vm_block_bytes(self) -> tuple[tuple[str, int], ...]:
        """``vm_block_sizes`` as (pattern, bytes) pairs, in the order written."""
        return tuple((pattern, parse_size(size)) for pattern, size in self.vm_block_sizes.items())


@dataclass(frozen=True)
class SelectionConfig:
    """Which VMs and disks are backed up by `backup --all`.

    With no names, tags and clusters, every VM of the engine is backed up (less exclude).
    """

    names: list[str] = opt([], "VM names or glob patterns", ["web-*", "db1"])
    tags: list[str] = opt([], "VMs carrying any of these engine tags", ["backup-nightly"])
    clusters: list[str] = opt([], "VMs in any of these clusters", ["Default"])
    exclude: list[str] = opt([], "VM names or glob patterns never backed up", ["*-scratch"])
    exclude_disks: list[str] = opt([], "disk aliases or ids never backed up", ["swap-*"])


@dataclass(frozen=True)
class BackupConfig:
    """How backups are made."""

    enable_incremental: bool = opt(True, "enable incremental backup on qcow2 disks that lack it")
    verify_sample: int = opt(4, "clean blocks re-read per disk on incrementals to check the dirty bitmap",
                             minimum=0)
    full_every_days: int = opt(0, "force a full read when the last full is this old (0: never)", 30, minimum=0)
    cold_backup: bool = opt(True, "use the backup API for powered-off VMs when the engine allows it")
    foreign_stale_hours: float = opt(24.0, "another tool's or job's backup left open on a VM is finalized "
                                     "once it is this old with no active image transfer (0: at once, as "
                                     "if it were this job's; for estates where ovirt-borg is the only tool)",
                                     minimum=0)
    prepare_ahead: int = opt(4, "VMs whose engine backups are started and awaited until ready, side by side, "
                             "and their first disk's image transfer opened, while the VM before them "
                             "streams into the repository (the VMs before are finalized side by side too; "
                             "each disk's image transfer is opened while the disk before it streams, its "
                             "end awaited when the VM is finished); the engine holds at most this many "
                             "backups prepared ahead, one streaming and this many + 1 finalizing (0: one VM "
                             "and one disk after another)", 2,
                             minimum=0, maximum=8)


@dataclass(frozen=True)
class TransferConfig:
    """The imageio data path."""

    readers: int = opt(4, "parallel imageio connections per disk (capped by the host's max_readers)",
                       minimum=1, maximum=16)
    connect_timeout: float = opt(10.0, "seconds to connect to imageio", above=0)
    read_timeout: float = opt(60.0, "seconds to wait for data of one request", above=0)
    extents_timeout: float = opt(600.0, "seconds to wait for the extents of a disk (slow on huge disks)", above=0)
    retries: int = opt(5, "retries of a failed range before giving up (with backoff)", minimum=0)
    use_proxy: bool = opt(False, "always go through the engine's imageio proxy (proxy_url)")
    host_ca_file: str = opt("", "CA certificate of the hosts' imageio (port 54322): the engine's internal CA "
                            "(https://ENGINE/ovirt-engine/services/pki-resource?resource=ca-certificate"
                            "&format=X509-PEM-CA), also when the engine's web certificate was replaced; "
                            "default: engine.ca_file", "/etc/ovirt-borg/engine-internal-ca.pem")
    bandwidth_limit: str = opt("", "cap on imageio bytes per second, e.g. 100M (empty: none)")
    inactivity_timeout: int = opt(120, "seconds the engine keeps an image transfer whose ticket is idle (imageio "
                                       "counts only running reads, not extents queries); ovirt-borg raises it to "
                                       "60 s above its own longest pause: extents_timeout, the wait bandwidth_limit "
                                       "puts before a 4 MiB read and, with the cli writer, repository.lock_wait; "
                                       "set it above the longest stall your repository may have (0: no limit)",
                                  minimum=0)


@dataclass(frozen=True)
class RetentionConfig:
    """Keep rules of `ovirt-borg prune`, applied per VM (Borg's prune options)."""

    keep_within: str = opt("", "keep all archives within this time (e.g. 2d)")
    keep_daily: int = opt(7, "daily archives to keep", minimum=0)
    keep_weekly: int = opt(4, "weekly archives to keep", minimum=0)
    keep_monthly: int = opt(6, "monthly archives to keep", minimum=0)
    keep_yearly: int = opt(0, "yearly archives to keep", minimum=0)


@dataclass(frozen=True)
class CheckpointsConfig:
    """Engine checkpoints."""

    keep: int = opt(1, "checkpoints to keep on the engine (the one the next incremental needs counts)",
                    minimum=1)
    other_jobs_days: int = opt(14, "a checkpoint that another job sharing the state directory still needs "
                               "is kept unless that job's last backup of the VM is older than this (0: always)",
                               minimum=0)


@dataclass(frozen=True)
class StateConfig:
    """Local state: the checkpoint sidecars."""

    directory: str = opt(DEFAULT_STATE_DIR, "where the per-VM sidecars are kept")


@dataclass(frozen=True)
class PluginsConfig:
    """Where plugin files are looked up (besides the ready ones shipped with ovirt-borg)."""

    directories: list[str] = opt([], "directories holding plugin files NAME.py, enabled by [hooks.NAME]",
                                 ["/etc/ovirt-borg/plugins"])


@dataclass(frozen=True)
class Config:
    """A whole job configuration."""

    engine: EngineConfig
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    hooks: dict[str, dict] = field(default_factory=dict)
    path: str = ""


_SECTIONS = {name: tp for name, tp in typing.get_type_hints(Config).items() if name not in ("hooks", "path")}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0]).split(" ", 1)[1] + "s"
    if origin is dict:
        return "a table of " + _type_name(typing.get_args(tp)[1]).split(" ", 1)[1] + "s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp))


def _check_value(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_check_value(v, typing.get_args(tp)[0]) for v in value)
    if typing.get_origin(tp) is dict:
        return isinstance(value, dict) and all(_check_value(v, typing.get_args(tp)[1]) for v in value.values())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_range(value: Any, meta: Mapping[str, Any]) -> str | None:
    """Why a number is out of its option's range (``opt``'s minimum, maximum, above), or None."""
    minimum, maximum, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        return f"must be from {minimum} to {maximum}"
    if minimum is not None and value < minimum:
        return "must not be negative" if minimum == 0 else f"must be at least {minimum}"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum}"
    if above is not None and value <= above:
        return "must be positive" if above == 0 else f"must be more than {above}"
    return None


def _build_section(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key '{where}.{key}'{nearest_hint(key, known)}; known keys in [{where}]: "
                + ", ".join(sorted(known)))
        tp = hints[key]
        if not _check_value(value, tp):
            raise ConfigError(
                f"{source}: '{where}.{key}' must be {_type_name(tp)}, got {value!r}")
        if tp in (int, float) and (problem := _check_range(value, known[key].metadata)):
            raise ConfigError(f"{source}: '{where}.{key}' {problem} (got {value!r})")
        values[key] = float(value) if tp is float else value
    for name, f in known.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{where}.{name}' ({f.metadata['help']})")
    return cls(**values)


def from_dict(data: dict, source: str = "<config>") -> Config:
    """Given the parsed TOML, return a validated Config; raises ConfigError."""
    sections = {}
    for key, value in data.items():
        if key == "hooks":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"{source}: [hooks] must hold one table per plugin, like [hooks.healthchecks]")
            continue
        if key not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{key}]{nearest_hint(key, [*_SECTIONS, 'hooks'])}; known sections: "
                + ", ".join(sorted(_SECTIONS) + ["hooks"]))
        sections[key] = _build_section(_SECTIONS[key], value, key, source)
    if "engine" not in sections:
        raise ConfigError(f"{source}: missing section [engine] (at least engine.url)")
    config = Config(**sections, hooks=dict(data.get("hooks", {})), path=source)
    _validate(config, source)
    return config


def _validate(config: Config, source: str) -> None:
    engine, repo = config.engine, config.repository
    if not re.match(r"^https?://", engine.url):
        raise ConfigError(f"{source}: 'engine.url' must start with https:// (got {engine.url!r})")
    if engine.url.startswith("http://") and not engine.allow_http:
        raise ConfigError(
            f"{source}: 'engine.url' is plain http://: the password would travel unencrypted; "
            "use https:// or set engine.allow_http = true")
    parts = urllib.parse.urlsplit(engine.url)
    if not parts.hostname or not re.fullmatch(API_PATH, parts.path):
        # The engine serves its API there alone (and the SDK logs in at /ovirt-engine/sso).
        raise ConfigError(f"{source}: 'engine.url' must be the engine's API URL, ending in /ovirt-engine/api, as "
                          f"https://engine.example.com/ovirt-engine/api (got {engine.url!r})")
    for key, text in [("block_size", repo.block_size),
                      *((f"vm_block_sizes.{pattern}", size) for pattern, size in repo.vm_block_sizes.items())]:
        try:
            block = parse_size(text)
        except ValueError as e:
            raise ConfigError(f"{source}: 'repository.{key}': {e}") from None
        if block < 64 * 1024 or block > 16 * 1024 * 1024 or block & (block - 1):
            raise ConfigError(f"{source}: 'repository.{key}' must be a power of two from 64K to 16M "
                              f"(got {text!r})")
    if repo.compression != "lz4":  # the default; anything else is checked by Borg's own parser
        try:
            archive.check_compression(repo.compression)
        except ValueError as e:
            raise ConfigError(f"{source}: 'repository.compression' is not a Borg compression spec "
                              f"(got {repo.compression!r}: {e})") from None
    keep_within = config.retention.keep_within
    if keep_within and not re.fullmatch(r"0*[1-9][0-9]*[Hdwmy]", keep_within):
        raise ConfigError(f"{source}: 'retention.keep_within' must be a number of hours, days, weeks, "
                          f"months or years, as 36H, 2d, 4w, 6m, 1y (got {keep_within!r})")
    if repo.rebuild_blocks not in REBUILD_CHOICES:
        raise ConfigError(f"{source}: 'repository.rebuild_blocks' must be "
                          f"{', '.join(map(repr, REBUILD_CHOICES[:-1]))} or {REBUILD_CHOICES[-1]!r} "
                          f"(got {repo.rebuild_blocks!r})")
    if repo.writer not in archive.WRITERS:
        raise ConfigError(f"{source}: 'repository.writer' must be {' or '.join(map(repr, archive.WRITERS))} "
                          f"(got {repo.writer!r})")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", repo.prefix):
        raise ConfigError(f"{source}: 'repository.prefix' must be non-empty (it keeps prune away from other "
                          "archives) and hold only letters, digits, '.', '_' and '-'")
    if config.transfer.bandwidth_limit:
        try:
            parse_size(config.transfer.bandwidth_limit)
        except ValueError as e:
            raise ConfigError(f"{source}: 'transfer.bandwidth_limit': {e}") from None


def load(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file; raises ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (create one with "
                          "'ovirt-borg generate-config > FILE')") from None
    except PermissionError:
        raise ConfigError(f"{path}: configuration file is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file (-c names a job's TOML file, "
                          "as /etc/ovirt-borg/NAME.toml)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data, str(path))


def write_sample(path: str | os.PathLike, *, force: bool = False) -> None:
    """Write ``sample_config()`` to ``path``, mode 0600 (it will name secret files).

    The file appears complete or not at all (a temporary file renamed into place). Raises
    ConfigError when ``path`` exists and ``force`` is not given, or cannot be written.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(sample_config())
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails, touching nothing, when path exists
    except FileExistsError:
        raise ConfigError(f"{path} exists; not overwritten (--force replaces it)") from None
    except OSError as e:
        raise ConfigError(f"cannot write the sample configuration to {path}: {e.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal (str, bool, int, float, a list or inline table of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f" {toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + (" }" if value else "}")
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes


def sample_config() -> str:
    """Return the documented sample configuration: every option, its default and an example."""
    lines = ["# ovirt-borg job configuration (/etc/ovirt-borg/<name>.toml).",
             "# Every option is shown with its default; uncomment and change what you need.", ""]
    for section, cls in _SECTIONS.items():
        lines.append(f"[{section}]")
        lines += [f"# {line.strip()}" for line in cls.__doc__.strip().splitlines() if line.strip()]
        for f in dataclasses.fields(cls):
            lines.append(f"# {f.metadata['help']}")
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            example = f.metadata.get("example")
            if default is None:
                lines.append(f"{f.name} = {toml_value(example)}")
                continue
            if example is not None and example != default:
                lines.append(f"#   example: {f.name} = {toml_value(example)}")
            lines.append(f"#{f.name} = {toml_value(default)}")
        lines.append("")
    lines += ["# Plugins are enabled by their section, for example:",
              "#[hooks.healthchecks]", '#url = "https://hc-ping.com/<uuid>"', ""]
    return "\n".join(lines)

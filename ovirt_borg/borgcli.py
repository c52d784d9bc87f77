"""Talk to Borg through its command line (``--json`` / ``--log-json``).

Everything in ovirt-borg that reads, lists, prunes or maintains a Borg repository goes through
this module; only :mod:`ovirt_borg.archive.borg14` writes archives with Borg's Python internals.

Secrets (``BORG_PASSPHRASE``, ``BORG_PASSCOMMAND``) travel in the environment of the ``borg``
process, never on its command line, and are never logged. Borg runs with
``BORG_EXIT_CODES=modern`` and ``--log-json`` so that a failure is recognised by its message id
(``LockTimeout``, ``PassphraseWrong``, ``Repository.DoesNotExist``, ...) and turned into one of
the typed errors of :mod:`ovirt_borg.errors`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ovirt_borg.errors import AuthError, ConfigError, NotFound, OvirtBorgError, RepositoryBusy, RepositoryError

__all__ = [
    "Repo",
    "compact",
    "delete_archive",
    "list_archives",
    "lock_holders",
    "log_lock_wait",
    "prune",
    "raise_for_mount",
    "start_mount",
    "translate_error",
]

log = logging.getLogger(__name__)

#: Environment variables that carry a Borg secret: passed to Borg, never logged.
SECRET_ENV = frozenset({"BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD", "BORG_NEW_PASSPHRASE"})

#: Where Borg may read a passphrase from without asking on a terminal.
PASSPHRASE_SOURCES = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD")

# How long a borg process gets to roll back and release its lock after SIGTERM.
_TERMINATE_GRACE = 30


@dataclass(frozen=True)
class Repo:
    """A Borg repository and how to reach it.

    ``location`` is a local path or ``ssh://user@host[:port]/path``; ``env`` holds the Borg
    environment for it (``BORG_PASSPHRASE`` / ``BORG_PASSCOMMAND`` / ``BORG_RSH`` /
    ``BORG_REMOTE_PATH`` / ``BORG_BASE_DIR`` ...). ``env`` is left out of ``repr`` because it
    usually holds the passphrase.
    """

    location: str
    env: Mapping[str, str] = field(repr=False)
    lock_wait: int = 60
    compression: str = "lz4"

    @property
    def remote(self) -> bool:
        """Whether Borg reaches the repository through ``borg serve`` (``ssh://``, or the
        ``user@host:path`` form), not as a local path (``file://`` included)."""
        if "://" in self.location:
            return not self.location.startswith("file://")
        return ":" in self.location.split("/", 1)[0]


# --------------------------------------------------------------------------------------------
# Errors


def translate_error(msgid: str | None, message: str, *, repo: Repo, archive: str | None = None,  # noqa: PLR0911
                    exit_code: int | None = None) -> OvirtBorgError:  # (a table of Borg's messages)
    """Turn a Borg failure into the typed ovirt-borg error for it.

    Given Borg's message id (the error's class ``__qualname__``, which is also the ``msgid`` of
    its ``--log-json`` error line), Borg's own message, the repository and archive concerned and,
    for the command line, the exit code (``BORG_EXIT_CODES=modern``). Returns the error to raise
    (it does not raise). Unknown failures become a ``RepositoryError`` carrying Borg's message.
    """
    where = f"repository {repo.location}"
    detail = f" (borg: {message})" if message else ""
    if msgid == "LockTimeout" or exit_code == 73:
        holders = lock_holders(repo)
        held = f" ({', '.join(holders)})" if holders else ""
        return RepositoryBusy(
            f"{where} is busy: another borg process holds its lock{held}; waited {repo.lock_wait} s "
            f"(repository.lock_wait); try again later or raise lock_wait{detail}")
    if msgid == "PassphraseWrong" or exit_code == 52:
        return AuthError(
            f"the Borg passphrase for {where} is wrong or missing; check BORG_PASSPHRASE / "
            f"BORG_PASSCOMMAND in the configuration")
    if msgid in ("NoPassphraseFailure", "PasswordRetriesExceeded") or exit_code in (50, 53):
        return AuthError(
            f"no usable Borg passphrase for {where}; set BORG_PASSPHRASE or BORG_PASSCOMMAND "
            f"in the configuration{detail}")
    if msgid == "PasscommandFailure" or exit_code == 51:
        return AuthError(f"the BORG_PASSCOMMAND for {where} failed; fix the command{detail}")
    if msgid in ("KeyfileNotFoundError", "KeyfileInvalidError", "KeyfileMismatchError",
                 "RepoKeyNotFoundError") or exit_code in (40, 41, 42, 44):
        return AuthError(f"the Borg key for {where} is missing or does not match{detail}")
    if msgid in ("Repository.DoesNotExist", "Repository.InvalidRepository",
                 "Repository.InvalidRepositoryConfig", "Repository.ParentPathDoesNotExist",
                 "NoManifestError") or exit_code in (13, 15, 16, 18):
        return RepositoryError(
            f"{where} does not exist or is not a Borg repository; create it (borg init) or fix "
            f"the location{detail}")
    if msgid in ("Repository.AlreadyExists", "Repository.PathAlreadyExists") or exit_code in (10, 19):
        return RepositoryError(f"{where} already exists; use it or choose another location{detail}")
    if msgid == "Archive.DoesNotExist" or exit_code == 31:
        return NotFound(f"archive {archive or '?'} does not exist in {where}{detail}")
    if msgid == "Archive.AlreadyExists" or exit_code == 30:
        return RepositoryError(
            f"archive {archive or '?'} already exists in {where}; choose another archive name")
    if msgid in ("Repository.StorageQuotaExceeded", "Repository.InsufficientFreeSpaceError") \
            or exit_code in (14, 20):
        return RepositoryError(f"{where} is full; prune and compact it or give it more space{detail}")
    if msgid in ("ConnectionClosed", "ConnectionClosedWithHint", "PathNotAllowed",
                 "RemoteRepository.RPCServerOutdated", "RPCServerOutdated"):
        return RepositoryError(f"cannot talk to the borg server for {where}; check ssh and "
                               f"BORG_RSH / BORG_REMOTE_PATH{detail}")
    if msgid in ("IntegrityError", "Repository.CheckNeeded", "Repository.ObjectNotFound") \
            or exit_code in (12, 17):
        return RepositoryError(f"{where} looks damaged; run borg check on it{detail}")
    if msgid in ("Cache.RepositoryAccessAborted",):
        return RepositoryError(
            f"Borg refused to use {where}: it was known under another location or is unknown "
            f"and unencrypted; set BORG_RELOCATED_REPO_ACCESS_IS_OK=yes or "
            f"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes if that is intended{detail}")
    if msgid and msgid.startswith("Cache."):
        return RepositoryError(f"the Borg cache for {where} does not match the repository{detail}")
    code = f" (exit code {exit_code})" if exit_code is not None else ""
    return RepositoryError(f"borg failed on {where}{code}: {message or msgid or 'no message'}")


# --------------------------------------------------------------------------------------------
# Running borg


def borg_executable() -> str:
    """Return the path of the ``borg`` program to run.

    The ``borg`` installed next to the running Python (the venv's bin directory) is preferred,
    so the command line and the internals are the same Borg version; otherwise ``borg`` on
    ``PATH``. Raises ``RepositoryError`` if there is none.
    """
    candidate = Path(sys.executable).parent / "borg"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("borg")
    if found:
        return found
    raise RepositoryError("the borg program was not found next to Python nor on PATH; install borgbackup")


def secret_environment(repo: Repo) -> dict[str, str | None]:
    """The passphrase variables Borg gets for ``repo``, None for one to unset.

    They come from ``repo.env`` alone: an inherited ``BORG_PASSPHRASE`` must not win over the
    job's passcommand (``credentials.borg_env`` put the inherited ones it honours into
    ``repo.env``). With no passphrase source, the empty passphrase: Borg never stops to ask on
    a terminal (an encrypted repository then fails with a clear ``AuthError``).
    """
    secrets: dict[str, str | None] = {name: repo.env.get(name) for name in SECRET_ENV}
    if not any(secrets[name] is not None for name in PASSPHRASE_SOURCES):
        secrets["BORG_PASSPHRASE"] = ""
    return secrets


def borg_environment(repo: Repo) -> dict[str, str]:
    """Return the environment for a ``borg`` process working on ``repo``.

    Given the repository; returns ``os.environ`` overlaid with ``repo.env``, with modern exit
    codes and the passphrase variables of ``secret_environment``.
    """
    env = dict(os.environ)
    env.update(repo.env)
    env["BORG_EXIT_CODES"] = "modern"
    for name, value in secret_environment(repo).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def borg_command(repo: Repo, *args: str, lock_wait: int | None = None) -> list[str]:
    """Return the argv for running ``borg <args>`` on ``repo`` (common options included).

    ``lock_wait`` overrides ``repo.lock_wait`` (seconds to wait for the repository lock).
    """
    wait = repo.lock_wait if lock_wait is None else lock_wait
    return [borg_executable(), "--log-json", "--lock-wait", str(wait), *args]


def lock_holders(repo: Repo, *, writers_only: bool = False) -> list[str]:
    """Return who holds the lock of the local repository ``repo`` (``host pid N``), as Borg records it.

    With ``writers_only``, only holders of the exclusive lock (those a reader waits for).
    Reads Borg's lock roster and exclusive lock directory; returns an empty list for a
    repository that is not locked, cannot be read, or is remote (``ssh://``, ``user@host:path``).
    """
    if repo.remote:
        return []
    base = Path(repo.location.removeprefix("file://"))
    owners: list[tuple] = []
    with contextlib.suppress(OSError, ValueError):
        roster = json.loads((base / "lock.roster").read_text())
        for kind in ("exclusive",) if writers_only else ("exclusive", "shared"):
            owners += [tuple(entry) for entry in roster.get(kind, [])]
    with contextlib.suppress(OSError):
        # A reader updating the roster holds this directory for a moment, a writer all along.
        for name in [] if writers_only else os.listdir(base / "lock.exclusive"):
            # <host>.<pid>-<thread>, the host being <hostname>@<node id>
            host, _, rest = name.rpartition(".")
            pid = rest.split("-", 1)[0]
            if pid.isdigit():
                owners.append((host, int(pid)))
    holders = []
    for owner in owners:
        if len(owner) < 2:
            continue
        described = f"{str(owner[0]).split('@', 1)[0]} pid {owner[1]}"
        if described not in holders:
            holders.append(described)
    return holders


def log_lock_wait(repo: Repo, certain: bool = True) -> None:
    """Say that ``repo`` is (``certain``) or may be locked by another borg, and for how long
    ovirt-borg will wait."""
    holders = lock_holders(repo)
    log.info("repository %s %s locked by another borg process%s; waiting up to %d s for its lock",
             repo.location, "is" if certain else "does not answer yet: it may be",
             f" ({', '.join(holders)})" if holders else "", repo.lock_wait)


def archive_location(repo: Repo, archive: str) -> str:
    """Return the ``REPOSITORY::ARCHIVE`` argument for an archive of ``repo``."""
    return f"{repo.location}::{archive}"


@dataclass
class BorgLog:
    """What a borg process said on stderr with ``--log-json``."""

    messages: list[dict] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        """Take one stderr line: keep JSON log messages and forward them to our log."""
        line = line.rstrip("\n")
        if not line:
            return
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            # ssh and the borg server can print plain lines; they carry no secrets of ours.
            self.other.append(line)
            log.debug("borg: %s", line)
            return
        if record.get("type") != "log_message":
            return
        self.messages.append(record)
        level = logging.getLevelName(record.get("levelname", "INFO"))
        if not isinstance(level, int):
            level = logging.INFO
        # Borg's INFO lines (key advice, file lists) are detail for us, not news; its errors
        # become the message of the typed error raised, which the caller reports or handles.
        log.log(logging.WARNING if level == logging.WARNING else logging.DEBUG, "borg: %s",
                record.get("message", ""))

    def error(self) -> tuple[str | None, str]:
        """Return (msgid, message) of the error Borg logged, or (None, its last plain line).

        For an unexpected exception Borg logs "Local Exception" and then the traceback; the
        message then ends with the exception line of that traceback.
        """
        errors = [r for r in self.messages if r.get("levelname") in ("ERROR", "CRITICAL")]
        if not errors:
            return None, (self.other[-1] if self.other else "")
        identified = [r for r in errors if r.get("msgid")]
        chosen = identified[-1] if identified else errors[-1]
        msgid, message = chosen.get("msgid"), chosen.get("message", "").strip()
        if msgid in ("Exception", "RemoteRepository.RPCError", "RPCError"):
            for record in errors:
                text = record.get("message", "")
                if text.startswith("Traceback"):
                    # The traceback ends at the first blank line; Borg's system info follows.
                    message = f"{message}: {text.split(chr(10) + chr(10))[0].strip().splitlines()[-1]}"
                    break
        return msgid, message

    def lines(self, logger_name: str) -> list[str]:
        """Return the messages Borg logged to ``logger_name`` (e.g. ``borg.output.list``)."""
        return [m.get("message", "") for m in self.messages if m.get("name") == logger_name]


def raise_for_borg(repo: Repo, returncode: int, borg_log: BorgLog, *, archive: str | None = None,
                   allow_warning: bool = True) -> None:
    """Raise the typed error for a finished borg process, if it failed.

    Given the repository, the exit code and what borg logged; an exit code of 0 (and, with
    ``allow_warning``, Borg's warning codes 1 and 100..127) is success. Raises an
    ``OvirtBorgError`` subclass otherwise.
    """
    if returncode == 0:
        return
    if allow_warning and (returncode == 1 or 100 <= returncode <= 127):
        log.warning("borg finished with warnings (exit code %d) on repository %s", returncode, repo.location)
        return
    msgid, message = borg_log.error()
    if returncode < 0:
        message = f"borg was killed by signal {-returncode}" + (f"; {message}" if message else "")
    raise translate_error(msgid, message, repo=repo, archive=archive, exit_code=returncode)


def _run(repo: Repo, *args: str, archive: str | None = None, cwd: str | os.PathLike | None = None,
         allow_warning: bool = True) -> tuple[bytes, BorgLog]:
    """Run ``borg <args>`` to completion; return (stdout bytes, its log) or raise a typed error.

    When another borg holds the repository lock, says so and waits up to ``repo.lock_wait``
    seconds for it (``RepositoryBusy`` after that).
    """
    if repo.lock_wait > 0:
        # A first try that does not wait tells whether we are about to wait for someone's lock.
        # A borg that fails to get the lock has done nothing yet, so it may be run again.
        try:
            return _run_once(repo, args, archive=archive, cwd=cwd, allow_warning=allow_warning, lock_wait=0)
        except RepositoryBusy:
            log_lock_wait(repo)
    return _run_once(repo, args, archive=archive, cwd=cwd, allow_warning=allow_warning)


def _run_once(repo: Repo, args: tuple[str, ...], *, archive: str | None, cwd: str | os.PathLike | None,
              allow_warning: bool, lock_wait: int | None = None) -> tuple[bytes, BorgLog]:
    argv = borg_command(repo, *args, lock_wait=lock_wait)
    log.debug("running %s", " ".join(argv))
    proc = subprocess.run(argv, env=borg_environment(repo), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, check=False)
    borg_log = BorgLog()
    for line in proc.stderr.decode("utf-8", "replace").splitlines():
        borg_log.feed(line)
    raise_for_borg(repo, proc.returncode, borg_log, archive=archive, allow_warning=allow_warning)
    return proc.stdout, borg_log


class BorgProcess:
    """A running ``borg`` process whose stderr log is collected by a background thread.

    Given the repository and the borg arguments; ``stdin``/``stdout`` as for ``subprocess.Popen``;
    ``die_with_parent``: borg gets SIGTERM if the thread that started it dies; ``writes``: borg
    takes the exclusive lock (for the notice about waiting for it). The process runs
    in its own session so that a Ctrl-C meant for ovirt-borg does not make
    Borg write a checkpoint archive; ovirt-borg stops it itself with :meth:`terminate`.
    """

    def __init__(self, repo: Repo, *args: str, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 archive: str | None = None, die_with_parent: bool = False, writes: bool = False):
        self.repo = repo
        self.archive = archive
        self.log = BorgLog()
        argv = borg_command(repo, *args)
        if repo.lock_wait > 0 and lock_holders(repo, writers_only=not writes):
            # Borg waits for the lock silently; say why nothing seems to happen.
            log_lock_wait(repo)
        log.debug("starting %s", " ".join(argv))
        setpriv = shutil.which("setpriv") if die_with_parent else None
        if setpriv:
            # Borg sees only the end of its input if ovirt-borg is killed; between two tar members
            # that looks like a complete stream and it would commit. SIGTERM makes it roll back.
            # (The signal comes when the thread that started borg ends.)
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        elif die_with_parent:
            log.warning("setpriv (util-linux) is missing: borg will not be stopped if ovirt-borg is killed")
        self.proc = subprocess.Popen(argv, env=borg_environment(repo), stdin=stdin, stdout=stdout,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, name="borg-stderr", daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.log.feed(raw.decode("utf-8", "replace"))

    def wait(self) -> int:
        """Wait for the process and its log; return the exit code."""
        returncode = self.proc.wait()
        self._stderr_thread.join()
        self.proc.stderr.close()
        return returncode

    def check(self, allow_warning: bool = True) -> None:
        """Wait for the process; raise the typed error if it failed."""
        raise_for_borg(self.repo, self.wait(), self.log, archive=self.archive, allow_warning=allow_warning)

    def terminate(self) -> None:
        """Stop the process (SIGTERM: Borg rolls back and releases its lock), then reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=_TERMINATE_GRACE)
            except subprocess.TimeoutExpired:
                log.warning("borg did not stop within %d s after SIGTERM; killing it", _TERMINATE_GRACE)
                self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.wait()


# --------------------------------------------------------------------------------------------
# Repository operations


def _parse_time(text: str) -> datetime:
    # Borg prints naive local times in --json output.
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.astimezone(timezone.utc)


def list_archives(repo: Repo, glob: str | None = None, *, checkpoints: bool = False) -> list[dict]:
    """Return the archives of ``repo``, oldest first.

    Given an optional shell-style ``glob`` on archive names (``borg list --glob-archives``);
    with ``checkpoints`` Borg's ``.checkpoint`` archives are listed too. Each archive is a dict
    with ``name`` (str), ``id`` (hex str), ``start`` (aware UTC ``datetime``) and ``comment``
    (str). Raises a typed error on failure.
    """
    return list_repository(repo, glob, checkpoints=checkpoints)[1]


def list_repository(repo: Repo, glob: str | None = None, *, checkpoints: bool = False) -> tuple[dict, list[dict]]:
    """``list_archives``, with the repository as Borg describes it beside them (``id``,
    ``location``, ``last_modified``)."""
    args = ["list", "--json", "--format", "{name}{id}{start}{comment}"]
    args += ["--consider-checkpoints"] if checkpoints else []
    if glob:
        args += ["--glob-archives", glob]
    out, _ = _run(repo, *args, repo.location)
    listing = json.loads(out)
    return listing["repository"], [{"name": entry["name"], "id": entry["id"], "start": _parse_time(entry["start"]),
                                    "comment": entry.get("comment", "")} for entry in listing["archives"]]


_PRUNED_LINE = re.compile(r"^(?:Would prune|Pruning archive \(\d+/\d+\)):\s+(?P<rest>.*?)\s*$")
_ARCHIVE_ID = re.compile(r"\[(?P<id>[0-9a-f]{64})\]$")
_KEEP_RULE = re.compile(r"^[a-z0-9]+$")


def start_mount(repo: Repo, archive: str, mountpoint: str | os.PathLike, *, log_file: str | os.PathLike,
                options: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``borg mount --foreground`` of the archive at ``mountpoint`` and return the process.

    It runs in a session of its own and serves the read-only FUSE file system until that is
    unmounted, after this process has ended too; its log goes to ``log_file`` (``--log-json``
    lines: ``raise_for_mount`` reads them if it exits early). ``options`` are FUSE mount options.
    The caller waits for the mount to appear or the process to end.
    """
    if repo.lock_wait > 0 and lock_holders(repo, writers_only=True):
        log_lock_wait(repo)  # Borg waits for the lock silently; say why nothing seems to happen.
    argv = borg_command(repo, "mount", "--foreground", *(("-o", ",".join(options)) if options else ()),
                        archive_location(repo, archive), os.fspath(mountpoint))
    log.debug("starting %s", " ".join(argv))
    with open(log_file, "ab") as output:
        return subprocess.Popen(argv, env=borg_environment(repo), stdin=subprocess.DEVNULL, stdout=output,
                                stderr=output, start_new_session=True)


def raise_for_mount(repo: Repo, archive: str, returncode: int, log_file: str | os.PathLike) -> None:
    """Raise the typed error of a ``borg mount`` that ended with ``returncode`` before mounting."""
    borg_log = BorgLog()
    with contextlib.suppress(OSError):
        for line in Path(log_file).read_text(errors="replace").splitlines():
            borg_log.feed(line)
    raise_for_borg(repo, returncode or 2, borg_log, archive=archive, allow_warning=False)


def prune(repo: Repo, glob: str, keep: Mapping[str, int | str], dry_run: bool = False) -> list[str]:
    """Prune the archives of ``repo`` whose names match ``glob`` with Borg's retention rules.

    ``keep`` maps rule names to values, e.g. ``{"daily": 7, "weekly": 4, "within": "2d"}``
    (``keep_daily`` / ``keep-daily`` are accepted too) and becomes ``--keep-daily 7`` ...
    Returns the names of the archives pruned (with ``dry_run``: that would be pruned). Raises
    ``ConfigError`` for an empty or malformed ``keep``, typed errors if borg fails.
    """
    if not glob:
        raise ConfigError("prune needs an archive name glob, so it never touches other archives")
    args = ["prune", "--list", "--glob-archives", glob]
    for rule, value in keep.items():
        name = rule.lower().replace("_", "-").removeprefix("keep-")
        if not _KEEP_RULE.match(name):
            raise ConfigError(f"unknown retention rule {rule!r}")
        args += [f"--keep-{name}", str(value)]
    if len(args) == 4:
        raise ConfigError("prune needs at least one keep rule (e.g. daily = 7)")
    if dry_run:
        args.append("--dry-run")
    names_by_id = {entry["id"]: entry["name"] for entry in list_archives(repo, glob)}
    _, borg_log = _run(repo, *args, repo.location)
    pruned = []
    for line in borg_log.lines("borg.output.list"):
        match = _PRUNED_LINE.match(line)
        if not match:
            continue
        found = _ARCHIVE_ID.search(match["rest"])
        if found and found["id"] in names_by_id:
            pruned.append(names_by_id[found["id"]])
        else:
            # Borg pads the name to 36 columns and follows it with the time: the first word.
            pruned.append(match["rest"].split()[0])
    log.info("%s %d archive(s) matching %s in %s", "would prune" if dry_run else "pruned",
             len(pruned), glob, repo.location)
    return pruned


def wait_for_lock(repo: Repo) -> None:
    """Wait until no other borg holds ``repo``'s lock: take it once and give it back.

    ``borg with-lock REPO true`` waits up to ``repo.lock_wait`` for the exclusive lock, so a
    shared holder (``borg mount``, ``borg list``) counts too. Raises ``RepositoryBusy`` after
    that, other typed errors when the repository cannot be reached.
    """
    _run(repo, "with-lock", repo.location, "true")


def compact(repo: Repo) -> None:
    """Free the space of deleted archives in ``repo`` (``borg compact``). Raises typed errors."""
    _run(repo, "compact", repo.location)


def delete_archive(repo: Repo, name: str) -> None:
    """Delete the archive ``name`` from ``repo``.

    Raises ``NotFound`` if it does not exist, other typed errors on failure. The space is only
    given back by :func:`compact`.
    """
    # borg delete of a missing archive only warns; say it plainly.
    if not any(entry["name"] == name for entry in list_archives(repo, checkpoints=True)):
        raise NotFound(f"archive {name} does not exist in repository {repo.location}")
    _run(repo, "delete", archive_location(repo, name), archive=name, allow_warning=False)
    log.info("deleted archive %s from %s", name, repo.location)

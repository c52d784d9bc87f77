"""Typed errors and exit codes.

Every error ovirt-borg raises on purpose is an ``OvirtBorgError``: it carries a message that
says what happened, to what, and what to do next, and the exit code ``cli.main`` returns for
it; a signal raises ``Interrupted``. Only ``cli.main`` turns errors into exit codes.

Exit codes (documented in ``ovirt-borg --help``):

==== =========================================================================
0    success
1    warning: the run finished but something needs attention (see the log)
2    error, including a configuration error or a bad argument
4    engine error (the oVirt engine refused or failed a request)
5    authentication error (engine user/password, Borg passphrase)
6    repository busy (another Borg process holds the lock)
7    checkpoint problem that a full backup could not work around
8    image transfer / imageio data path error
9    Borg repository error (missing, corrupt, full)
10   verify found a mismatch
11   the requested VM, disk or archive does not exist
12   another run of the same job is in progress
128+n  interrupted by signal n (129 for SIGHUP, 130 for SIGINT, 143 for SIGTERM)
==== =========================================================================
"""

from __future__ import annotations

import difflib
from typing import Iterable

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_ERROR = 2


class OvirtBorgError(Exception):
    """Base of all errors ovirt-borg reports to the user."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def nearest_hint(name: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'a' or 'b'?"`` with the choices nearest to ``name`` (difflib's
    similarity), for the end of a message about a name that does not exist; '' when none is
    near."""
    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not near:
        return ""
    return "; did you mean " + " or ".join(repr(choice) for choice in near) + "?"


class ConfigError(OvirtBorgError):
    """The configuration file or a command-line argument is wrong."""

    exit_code = EXIT_ERROR


class EngineError(OvirtBorgError):
    """The oVirt engine refused or failed a request."""

    exit_code = 4


class AuthError(OvirtBorgError):
    """Authentication failed (engine credentials or Borg passphrase)."""

    exit_code = 5


class RepositoryBusy(OvirtBorgError):
    """Another process holds the Borg repository lock."""

    exit_code = 6


class CheckpointError(OvirtBorgError):
    """A checkpoint problem that could not be worked around."""

    exit_code = 7


class TransferError(OvirtBorgError):
    """An image transfer or an imageio request failed."""

    exit_code = 8


class RepositoryError(OvirtBorgError):
    """The Borg repository is missing, damaged, full or refused a request."""

    exit_code = 9


class VerifyMismatch(OvirtBorgError):
    """Verify found data that does not match the hashes recorded at backup time."""

    exit_code = 10


class NotFound(OvirtBorgError):
    """The requested VM, disk or archive does not exist."""

    exit_code = 11


class JobLocked(OvirtBorgError):
    """Another run of the same job holds the job lock."""

    exit_code = 12


class PluginError(OvirtBorgError):
    """A plugin failed in a hook whose answer the run needs (``before_vm``, which may veto)."""

    exit_code = EXIT_ERROR


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP).

    Like ``KeyboardInterrupt`` it is no ``Exception``: no handler of errors takes it for one
    (a VM's failure, a plugin's, a courtesy call's), while every ``finally`` and ``except
    BaseException`` cleanup runs. Its exit code is 128 + the signal's number.
    """

    def __init__(self, signum: int):
        import signal

        self.message = f"interrupted by {signal.Signals(signum).name}"
        super().__init__(self.message)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return self.message

"""Secrets: the engine password and the Borg passphrase.

Secrets come from files, systemd credentials (``$CREDENTIALS_DIRECTORY``, set by
``LoadCredential=``), a passphrase command or an existing borgmatic configuration
(:mod:`ovirt_borg.borgmatic`); never from the command line. The engine password
stays in this process; the Borg passphrase is handed only to Borg (in-process for the archive
writer, or the environment of the ``borg`` child process).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ovirt_borg import borgmatic
from ovirt_borg.config import Config
from ovirt_borg.errors import ConfigError

ENGINE_CREDENTIAL = "engine-password"
BORG_CREDENTIAL = "borg-passphrase"

log = logging.getLogger(__name__)


def _credential_file(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def _read_secret(path: Path, what: str) -> str:
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} from {path}: {e.strerror}") from None
    if mode & stat.S_IROTH:
        log.warning("the %s file %s is readable by every user (mode %04o): chmod 600 %s", what, path,
                    stat.S_IMODE(mode), path)
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError(f"the {what} file {path} is empty")
    return secret


def engine_password(config: Config) -> str:
    """Return the engine password from engine.password_file or the systemd credential.

    Raises ConfigError when neither is available or readable.
    """
    if config.engine.password_file:
        return _read_secret(Path(config.engine.password_file), "engine password")
    credential = _credential_file(ENGINE_CREDENTIAL)
    if credential:
        return _read_secret(credential, "engine password")
    raise ConfigError(
        f"{config.path}: no engine password: set engine.password_file or provide the systemd "
        f"credential '{ENGINE_CREDENTIAL}' (LoadCredential=)")


def borg_env(config: Config) -> dict[str, str]:
    """Return the BORG_* variables Borg needs to open the configured repository.

    Given the job configuration; returns the environment for Borg, ``BORG_REPO`` included.
    Each setting comes from the first of: the job's own ``[repository]`` options (location,
    which may also name a borgmatic repository by its label; passcommand, passphrase_file,
    rsh, remote_path), the borgmatic configuration named by
    ``repository.borgmatic_config`` (its repository, encryption_passphrase or
    encryption_passcommand, ssh_command, remote_path, borg_*_directory), the systemd credential
    ``borg-passphrase`` (for the passphrase), and the inherited environment (BORG_REPO,
    BORG_PASSCOMMAND, BORG_PASSPHRASE, BORG_RSH, BORG_REMOTE_PATH ... as Borg honours them).
    Logs a warning when borgmatic's prune could reach this job's archives. Raises ConfigError
    when there is no repository or a secret cannot be read.
    """
    repo = config.repository
    env = {k: v for k, v in os.environ.items() if k.startswith("BORG_")}
    shared = None
    if repo.borgmatic_config:
        shared = borgmatic.load(repo.borgmatic_config, repo.location or None)
        env.update(shared.environment)
        # repository.location, when set, chose this repository (by path or borgmatic label).
        env["BORG_REPO"] = shared.repository
        for warning in borgmatic.overlap_warnings(shared, repo.prefix):
            log.warning("%s", warning)
    elif repo.location:
        env["BORG_REPO"] = repo.location
    if not env.get("BORG_REPO"):
        raise ConfigError(f"{config.path}: no repository: set repository.location, repository.borgmatic_config "
                          f"or BORG_REPO")
    if repo.passcommand:
        env.pop("BORG_PASSPHRASE", None)
        env["BORG_PASSCOMMAND"] = repo.passcommand
    elif repo.passphrase_file:
        env.pop("BORG_PASSCOMMAND", None)
        env["BORG_PASSPHRASE"] = _read_secret(Path(repo.passphrase_file), "Borg passphrase")
    elif shared is not None and shared.passphrase:
        # borgmatic prefers encryption_passphrase when both are set; so does ovirt-borg.
        env.pop("BORG_PASSCOMMAND", None)
        env["BORG_PASSPHRASE"] = shared.passphrase
    elif shared is not None and shared.passcommand:
        env.pop("BORG_PASSPHRASE", None)
        env["BORG_PASSCOMMAND"] = shared.passcommand
    elif credential := _credential_file(BORG_CREDENTIAL):
        env.pop("BORG_PASSCOMMAND", None)
        env["BORG_PASSPHRASE"] = _read_secret(credential, "Borg passphrase")
    if repo.rsh:
        env["BORG_RSH"] = repo.rsh
    if repo.remote_path:
        env["BORG_REMOTE_PATH"] = repo.remote_path
    # Never ask on a terminal in the middle of a nightly run.
    env.setdefault("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no")
    env.setdefault("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "no")
    return env

"""Secrets: the engine password and the Borg passphrase.

Secrets come from files, systemd credentials (``$CREDENTIALS_DIRECTORY``, set by
``LoadCredential=``) or a passphrase command; never from the command line. The engine password
stays in this process; the Borg passphrase is handed only to Borg (in-process for the archive
writer, or the environment of the ``borg`` child process).
"""

from __future__ import annotations

import os
from pathlib import Path

from ovirt_borg.config import Config
from ovirt_borg.errors import ConfigError

ENGINE_CREDENTIAL = "engine-password"
BORG_CREDENTIAL = "borg-passphrase"


def _credential_file(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} from {path}: {e.strerror}") from None
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

    Explicit settings win over the inherited environment (BORG_REPO, BORG_PASSCOMMAND,
    BORG_PASSPHRASE, BORG_RSH, BORG_REMOTE_PATH are honoured as Borg honours them).
    """
    repo = config.repository
    env = {k: v for k, v in os.environ.items() if k.startswith("BORG_")}
    if repo.location:
        env["BORG_REPO"] = repo.location
    if not env.get("BORG_REPO"):
        raise ConfigError(f"{config.path}: no repository: set repository.location or BORG_REPO")
    if repo.passcommand:
        env.pop("BORG_PASSPHRASE", None)
        env["BORG_PASSCOMMAND"] = repo.passcommand
    elif repo.passphrase_file:
        env.pop("BORG_PASSCOMMAND", None)
        env["BORG_PASSPHRASE"] = _read_secret(Path(repo.passphrase_file), "Borg passphrase")
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

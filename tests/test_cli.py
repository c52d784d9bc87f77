"""The command line: complete help for every command, documented exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ovirt_borg import errors
from ovirt_borg.cli import COMMANDS, build_parser

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")


def help_text(*args: str) -> str:
    proc = subprocess.run([OVIRT_BORG, *args, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_top_level_help_lists_commands_and_exit_codes():
    text = help_text()
    for command in [*COMMANDS, "generate-config"]:
        assert command in text, command
    for cls in (errors.EngineError, errors.AuthError, errors.RepositoryBusy, errors.CheckpointError,
                errors.TransferError, errors.RepositoryError, errors.VerifyMismatch, errors.NotFound,
                errors.JobLocked):
        assert f"  {cls.exit_code}  " in text or f"  {cls.exit_code} " in text, cls.__name__
    assert "128+n" in text and "CREDENTIALS_DIRECTORY" in text


@pytest.mark.parametrize("command", [*COMMANDS, "generate-config"])
def test_every_command_has_a_description_and_documented_options(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert sub.description and len(sub.description) > 40, command
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert "usage:" in help_text(command)


def test_version():
    proc = subprocess.run([OVIRT_BORG, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ovirt-borg ")


def test_unknown_command_is_exit_2():
    proc = subprocess.run([OVIRT_BORG, "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr

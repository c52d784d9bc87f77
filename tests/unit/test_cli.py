"""The command line: complete help for every command, documented exit codes, every command in
the README's table."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import kept_root_logging
from ovirt_borg import errors, logs
from ovirt_borg.cli import COMMANDS, WITHOUT_CONFIG, build_parser

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")
README = Path(__file__).resolve().parents[2] / "README.md"


def help_text(*args: str) -> str:
    proc = subprocess.run([OVIRT_BORG, *args, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_top_level_help_lists_commands_and_exit_codes():
    text = help_text()
    for command in [*COMMANDS, *WITHOUT_CONFIG]:
        assert command in text, command
    for cls in (errors.EngineError, errors.AuthError, errors.RepositoryBusy, errors.CheckpointError,
                errors.TransferError, errors.RepositoryError, errors.VerifyMismatch, errors.NotFound,
                errors.JobLocked):
        assert f"  {cls.exit_code}  " in text or f"  {cls.exit_code} " in text, cls.__name__
    assert "128+n" in text and "CREDENTIALS_DIRECTORY" in text


@pytest.mark.parametrize("command", [*COMMANDS, *WITHOUT_CONFIG])
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


@pytest.mark.parametrize("last", ["0", "-1", "two"])
def test_verify_last_must_be_one_or_more(last):
    proc = subprocess.run([OVIRT_BORG, "verify", "web", "--last", last], capture_output=True, text=True)
    assert proc.returncode == 2 and "--last" in proc.stderr, proc.stderr


@pytest.mark.parametrize("verbose, own, libraries", [(0, False, False), (1, True, False), (2, True, True)])
def test_verbose_adds_ovirt_borgs_debug_output_and_twice_the_libraries(verbose, own, libraries):
    with kept_root_logging():
        logs.setup(verbose, stream=io.StringIO())
        assert logging.getLogger("ovirt_borg.backup").isEnabledFor(logging.DEBUG) is own
        assert logging.getLogger("ovirt_borg.backup").isEnabledFor(logging.INFO)
        for library in ("ovirtsdk4", "borg.repository", "urllib3"):
            assert logging.getLogger(library).isEnabledFor(logging.DEBUG) is libraries, library


def test_the_readme_command_table_lists_every_command():
    text = README.read_text()
    table = text[text.index("## Commands"):text.index("### Exit codes")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for command in [*COMMANDS, *WITHOUT_CONFIG]:
        assert any(f"`{command} " in row or f"`{command}`" in row for row in rows), command

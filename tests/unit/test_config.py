"""Configuration: every kind of error is one clear line and exit 2; the sample round-trips."""

import subprocess
import sys
import tomllib

import pytest

from helpers import kept_root_logging
from ovirt_borg import config as config_mod
from ovirt_borg.cli import main

GOOD = """
[engine]
url = "https://engine.example.com/ovirt-engine/api"
password_file = "/etc/ovirt-borg/engine.password"
[repository]
location = "/srv/borg"
"""


@pytest.fixture(autouse=True)
def _logging_put_back():
    """``main()`` sets up logging on the stderr capsys gives the test, closed after it."""
    with kept_root_logging():
        yield


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_good_config_loads(tmp_path):
    config = config_mod.load(write(tmp_path, GOOD))
    assert config.repository.block_bytes == 1 << 20
    assert config.repository.vm_block_bytes() == ()
    assert config.engine.user == "admin@internal"
    assert config.transfer.readers == 4
    sizes = "vm_block_sizes = { 'db-*' = '256K', 'db-big' = '4M', '*' = '2M' }"
    config = config_mod.load(write(tmp_path, GOOD.replace("[repository]", "[repository]\n" + sizes)))
    assert config.repository.vm_block_bytes() == (("db-*", 256 << 10), ("db-big", 4 << 20), ("*", 2 << 20))


def test_block_size_per_vm_first_match_wins():
    from ovirt_borg.backup import BackupSettings

    settings = BackupSettings(block_size=1 << 20, vm_block_sizes=(("db-*", 256 << 10), ("db-big", 4 << 20)))
    assert settings.for_vm("db-big").block_size == 256 << 10
    assert settings.for_vm("web1") is settings
    assert settings.for_vm("db-1") == BackupSettings(block_size=256 << 10, vm_block_sizes=settings.vm_block_sizes)


@pytest.mark.parametrize("text, expected", [
    (GOOD + "\n[nonsense]\nx = 1\n", "unknown section [nonsense]"),
    (GOOD.replace("[repository]", "[repository]\ncolour = 'red'"), "unknown key 'repository.colour'"),
    (GOOD + "\n[transfer]\nreaders = 'four'\n", "'transfer.readers' must be an integer"),
    (GOOD + "\n[transfer]\nretries = true\n", "'transfer.retries' must be an integer"),
    (GOOD + "\n[backup]\ncold_backup = 'yes'\n", "'backup.cold_backup' must be true or false"),
    (GOOD + "\n[selection]\nnames = 'web'\n", "'selection.names' must be a list of strings"),
    ("[repository]\nlocation = '/srv'\n", "missing section [engine]"),
    ("[engine]\nuser = 'x'\n", "missing required key 'engine.url'"),
    (GOOD.replace("https://", "http://"), "plain http://"),
    (GOOD.replace("[repository]", "[repository]\nblock_size = '3M'"), "power of two"),
    (GOOD.replace("[repository]", "[repository]\nvm_block_sizes = { 'db-*' = '100K' }"),
     "'repository.vm_block_sizes.db-*' must be a power of two"),
    (GOOD.replace("[repository]", "[repository]\nvm_block_sizes = '256K'"),
     "'repository.vm_block_sizes' must be a table of strings"),
    (GOOD.replace("[repository]", "[repository]\nwriter = 'fast'"), "'repository.writer'"),
    (GOOD.replace("[repository]", "[repository]\nlock_wait = -1"), "'repository.lock_wait' must not be negative"),
    (GOOD.replace("[repository]", "[repository]\ncompression = 'zstd,99'"),
     "'repository.compression' is not a Borg compression spec"),
    (GOOD.replace("[repository]", "[repository]\ncompression = 'fast'"),
     "'repository.compression' is not a Borg compression spec"),
    (GOOD + "\n[retention]\nkeep_within = '2 days'\n", "'retention.keep_within' must be a number"),
    (GOOD + "\n[retention]\nkeep_within = '0d'\n", "'retention.keep_within' must be a number"),
    ("[engine\n", "not valid TOML"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(path)
    assert expected in str(e.value)
    assert path in str(e.value)
    assert main(["-c", path, "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0]


def test_missing_file_and_unreadable_password(tmp_path, capsys):
    assert main(["-c", str(tmp_path / "nope.toml"), "list"]) == 2
    assert "configuration file not found" in capsys.readouterr().err
    path = write(tmp_path, GOOD.replace("/etc/ovirt-borg/engine.password", str(tmp_path / "missing")))
    assert main(["-c", path, "backup", "vm1"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the engine password" in err


def test_sample_config_round_trips():
    sample = config_mod.sample_config()
    data = tomllib.loads(sample)
    config = config_mod.from_dict(data, "sample")
    defaults = config_mod.from_dict({"engine": {"url": data["engine"]["url"]}}, "sample")
    assert config == defaults
    # every option of every section is documented in the sample
    import dataclasses
    for section, cls in config_mod._SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{f.name} = " in sample, (section, f.name)


def test_generate_config_command():
    out = subprocess.run([sys.executable, "-m", "ovirt_borg.cli", "generate-config"], capture_output=True,
                         text=True, check=True).stdout
    assert tomllib.loads(out)["engine"]["url"].startswith("https://")
